"""The Fashion-MNIST zoo nets: architecture rules, preprocessing, and the cached trained models."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from edgekit.data.fashion_mnist import arrays
from edgekit.errors import EdgekitError
from edgekit.models import load
from edgekit.models.fmnist import CNN_RECIPE, MEAN, STD, VGG_RECIPE, build_cnn, build_vgg, preprocess
from edgekit.models.training import accuracy, to_tensor

SNN_FRIENDLY = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.AvgPool2d, nn.Linear, nn.Dropout, nn.Flatten)


def test_nets_build_and_run() -> None:
    x = torch.randn(2, 1, 28, 28)
    for build in (build_cnn, build_vgg):
        assert build().eval()(x).shape == (2, 10)
    assert any(isinstance(m, nn.BatchNorm2d) for m in build_cnn().modules())


def test_vgg_uses_only_layers_with_a_spiking_counterpart() -> None:
    layers = list(build_vgg().children())
    assert all(isinstance(m, SNN_FRIENDLY) for m in layers), {type(m).__name__ for m in layers}
    assert all(m.bias is None for m in layers if isinstance(m, nn.Conv2d))


def test_preprocess() -> None:
    image = np.full((28, 28), 255, dtype=np.uint8)
    x = preprocess(image)["x"]
    assert x.shape == (1, 1, 28, 28) and x.dtype == torch.float32
    assert torch.allclose(x, torch.full_like(x, (1.0 - MEAN) / STD))
    with pytest.raises(EdgekitError, match="28x28"):
        preprocess(np.zeros((32, 32), dtype=np.uint8))


def test_recipe_change_changes_cache_name() -> None:
    assert CNN_RECIPE.tag() != VGG_RECIPE.tag()
    assert dataclasses.replace(CNN_RECIPE, epochs=CNN_RECIPE.epochs + 1).tag() != CNN_RECIPE.tag()
    assert CNN_RECIPE.tag().startswith(f"r{CNN_RECIPE.version}-")


@pytest.mark.slow
@pytest.mark.parametrize("name, floor", [("fmnist-cnn", 0.89), ("fmnist-vgg", 0.92)])
def test_zoo_model_accuracy(name: str, floor: float) -> None:
    """Trains on first use (minutes, once), then loads from the cache in well under a second."""
    bundle = load(f"zoo:{name}")
    assert bundle.task == "classifier" and bundle.dataset == "fashion-mnist" and len(bundle.labels) == 10
    assert bundle.input_names == ["x"] and bundle.output_names == ["logits"]
    assert bundle.dynamic_axes == {"x": {0: "batch"}}
    assert bundle.module(**bundle.example_inputs).shape == (1, 10)
    assert bundle.meta["test_accuracy"] > floor and bundle.meta["test_images"] == 10_000
    images, labels = arrays("eval")
    measured = accuracy(bundle.module, to_tensor(images[:1000], MEAN, STD), labels[:1000])
    assert measured > floor - 0.02, measured  # 1000 images: within sampling noise of the full-set number
    via_preprocess = torch.cat([bundle.preprocess(image)["x"] for image in images[:8]])
    assert torch.equal(via_preprocess, to_tensor(images[:8], MEAN, STD))
