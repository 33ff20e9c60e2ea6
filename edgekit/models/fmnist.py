"""The two Fashion-MNIST zoo models, trained here on first use and cached.

* ``fmnist-cnn``: a small conv-BN-ReLU-maxpool CNN (29k parameters), 90.95% test accuracy after
  3 epochs (74 CPU-seconds on one core); the quick model for quantization and export demos.
* ``fmnist-vgg``: a VGG-style stack (3x3 conv, BatchNorm, ReLU, average pooling, dropout,
  one linear layer). It is the ANN the IIR-SNN recipe converts, so it uses only layers with
  a spiking counterpart: bias-free convs, BN (foldable into the convs), ReLU, AvgPool
  (average pooling of spikes stays a linear op, max pooling does not), Flatten, Dropout, Linear.
  78k parameters, 92.78% test accuracy after 5 epochs (246 CPU-seconds on one core).

Inputs are named ``x``: float [B,1,28,28], pixels scaled to [0,1] then normalised with the
training-set mean 0.2860 and std 0.3530. Training is deterministic for a given seed (fixed
initialisation, data order and augmentation draws); the weights land in the edgekit cache
under a name that includes the recipe version and a hash of its settings, so changing the
recipe retrains instead of reusing stale weights.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgekit.cache import MANIFEST, cached_entry
from edgekit.data import fashion_mnist
from edgekit.models.bundle import ModelBundle
from edgekit.models.sources import state_hash
from edgekit.models.training import accuracy, to_tensor, train_classifier

MEAN = 0.2860  # Fashion-MNIST training-set pixel mean (pixels / 255)
STD = 0.3530  # ... and standard deviation
WEIGHTS = "weights.pt"


@dataclass(frozen=True)
class Recipe:
    """How a zoo net is trained; ``version`` is bumped when the architecture or loop changes."""

    version: int
    epochs: int
    lr: float
    batch_size: int
    seed: int = 0
    augment: bool = False
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0

    def tag(self) -> str:
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:8]
        return f"r{self.version}-{digest}"


CNN_RECIPE = Recipe(version=1, epochs=3, lr=3e-3, batch_size=128)
VGG_RECIPE = Recipe(version=1, epochs=5, lr=3e-3, batch_size=128)


class Net(nn.Sequential):
    """A Sequential whose forward names its input ``x``: bundles call ``module(**example_inputs)``.

    Subclassing (not wrapping) keeps the state-dict keys ``0.weight, 1.running_mean, ...``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x)
        return x


def _conv_bn_relu(inp: int, out: int) -> list[nn.Module]:
    return [nn.Conv2d(inp, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]


def build_cnn() -> Net:
    """28 -> 14 -> 7 -> 3 pixels over three conv-BN-ReLU-maxpool stages, then one linear layer."""
    return Net(
        *_conv_bn_relu(1, 16), nn.MaxPool2d(2),
        *_conv_bn_relu(16, 32), nn.MaxPool2d(2),
        *_conv_bn_relu(32, 64), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 3 * 3, 10),
    )  # fmt: skip


def build_vgg(width: int = 16) -> Net:
    """VGG-style: three stages of two 3x3 conv-BN-ReLU and a 2x2 average pool, dropout, linear."""
    w = width
    return Net(
        *_conv_bn_relu(1, w), *_conv_bn_relu(w, w), nn.AvgPool2d(2),
        *_conv_bn_relu(w, 2 * w), *_conv_bn_relu(2 * w, 2 * w), nn.AvgPool2d(2),
        *_conv_bn_relu(2 * w, 4 * w), *_conv_bn_relu(4 * w, 4 * w), nn.AvgPool2d(2),
        nn.Flatten(), nn.Dropout(0.2), nn.Linear(4 * w * 3 * 3, 10),
    )  # fmt: skip


def preprocess(image: np.ndarray) -> dict[str, torch.Tensor]:
    """uint8 [28,28] (or float in [0,1]) -> {"x": float [1,1,28,28]} normalised like training."""
    array = np.asarray(image)
    if array.shape != (28, 28):
        from edgekit.errors import EdgekitError

        raise EdgekitError(f"Fashion-MNIST models take 28x28 grey images, got shape {array.shape}")
    return {"x": to_tensor(array[None], MEAN, STD)}


def train_and_save(name: str, build: Callable[[], nn.Module], recipe: Recipe, directory: Path, meta: dict) -> None:
    """Train ``build()`` with ``recipe`` on the 60k training images; write weights and fill ``meta``."""
    train_images, train_labels = fashion_mnist.arrays("calib")
    test_images, test_labels = fashion_mnist.arrays("eval")
    with torch.random.fork_rng():  # seed the construction without disturbing the caller's RNG
        torch.manual_seed(recipe.seed)
        model = build()
        report = train_classifier(
            model, train_images, train_labels,
            epochs=recipe.epochs, lr=recipe.lr, batch_size=recipe.batch_size, seed=recipe.seed,
            augment=recipe.augment, mean=MEAN, std=STD, weight_decay=recipe.weight_decay,
            label_smoothing=recipe.label_smoothing, description=f"training {name}",
        )  # fmt: skip
    test_accuracy = accuracy(model, to_tensor(test_images, MEAN, STD), test_labels)
    torch.save(model.state_dict(), directory / WEIGHTS)
    meta.update(
        test_accuracy=test_accuracy,
        test_images=len(test_labels),
        train_seconds=round(report.seconds, 1),
        train_cpu_seconds=round(report.cpu_seconds, 1),
        epoch_losses=[round(loss, 4) for loss in report.epoch_losses],
        recipe=asdict(recipe),
        torch_threads=torch.get_num_threads(),
    )
    (directory / "meta.json").write_text(json.dumps(meta, indent=1))


def trained(name: str, build: Callable[[], nn.Module], recipe: Recipe) -> tuple[nn.Module, dict]:
    """The cached trained net and its training record, training it first when the cache lacks it."""
    meta: dict = {}
    entry = cached_entry(
        f"{name}-{recipe.tag()}", lambda directory: train_and_save(name, build, recipe, directory, meta), meta
    )
    meta = json.loads((entry / MANIFEST).read_text())["meta"]
    model = build()
    model.load_state_dict(torch.load(entry / WEIGHTS, map_location="cpu", weights_only=True), strict=True)
    return model.eval(), meta


def _bundle(name: str, build: Callable[[], nn.Module], recipe: Recipe, description: str) -> ModelBundle:
    model, meta = trained(name, build, recipe)
    first = fashion_mnist.arrays("eval")[0][0]
    return ModelBundle(
        spec=f"zoo:{name}",
        module=model,
        example_inputs=preprocess(first),
        task="classifier",
        output_names=["logits"],
        dynamic_axes={"x": {0: "batch"}},
        preprocess=preprocess,
        labels=list(fashion_mnist.CLASSES),
        dataset="fashion-mnist",
        source_hash=state_hash(model),
        description=description,
        meta={**meta, "input_mean": MEAN, "input_std": STD},
    )


def load_cnn() -> ModelBundle:
    return _bundle("fmnist-cnn", build_cnn, CNN_RECIPE, "small CNN with BatchNorm trained on Fashion-MNIST")


def load_vgg() -> ModelBundle:
    return _bundle(
        "fmnist-vgg", build_vgg, VGG_RECIPE, "VGG-style ANN (conv/BN/ReLU/avg-pool) trained on Fashion-MNIST"
    )
