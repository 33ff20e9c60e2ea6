"""MobileNetV2: our module loads torchvision's real weights strictly and classifies real photos."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgekit.data import items
from edgekit.data.photos import is_correct, photo
from edgekit.errors import EdgekitError
from edgekit.models import load
from edgekit.models.mobilenetv2 import MobileNetV2, preprocess, weights_path

pytestmark = pytest.mark.slow
CAT_CLASSES = (281, 282, 285)  # tabby, tiger cat, Egyptian cat


@pytest.fixture(scope="module")
def bundle():
    return load("zoo:mobilenetv2")


def test_state_dict_keys_match_torchvision_checkpoint() -> None:
    checkpoint = torch.load(weights_path(), map_location="cpu", weights_only=True)
    ours = MobileNetV2().state_dict()
    assert list(ours) == list(checkpoint)
    assert all(ours[key].shape == checkpoint[key].shape for key in ours)
    assert sum(1 for m in MobileNetV2().modules() if isinstance(m, torch.nn.BatchNorm2d)) == 52


def test_bundle_contract(bundle) -> None:
    assert bundle.task == "classifier" and bundle.dataset == "photos"
    assert bundle.input_names == ["pixel_values"] and bundle.output_names == ["logits"]
    assert bundle.example_inputs["pixel_values"].shape == (1, 3, 224, 224)
    assert len(bundle.labels) == 1000 and bundle.labels[281] == "tabby"
    with torch.no_grad():
        logits = bundle.module(**bundle.example_inputs)
    assert logits.shape == (1, 1000)
    assert bundle.module(**bundle.example_inputs).shape == (1, 1000)  # eval mode: dropout off, deterministic
    with torch.no_grad():
        assert torch.equal(logits, bundle.module(**bundle.example_inputs))


def test_chelsea_is_a_cat(bundle) -> None:
    with torch.no_grad():
        logits = bundle.module(**bundle.preprocess(photo("chelsea")))[0]
    assert int(logits.argmax()) in CAT_CLASSES
    assert float(logits.softmax(-1)[list(CAT_CLASSES)].sum()) > 0.9


def test_labelled_photos_top1(bundle) -> None:
    """Measured: 4 of 7 (chelsea, coffee, china, camera right; rocket, grace_hopper, clock wrong)."""
    evaluation = items("photos", "eval")
    with torch.no_grad():
        hits = [is_correct(bundle.module(**bundle.preprocess(item.raw)).numpy(), item.target) for item in evaluation]
    assert sum(hits) >= 4, dict(zip([item.name for item in evaluation], hits, strict=True))


def test_preprocess_shapes_and_errors() -> None:
    grey_tall = np.full((300, 200), 128, dtype=np.uint8)
    out = preprocess(grey_tall)["pixel_values"]
    assert out.shape == (1, 3, 224, 224) and out.dtype == torch.float32
    expected = (128 / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(out[0, :, 100, 100].numpy(), expected, rtol=1e-5)
    assert preprocess(np.zeros((25, 25, 3), dtype=np.uint8))["pixel_values"].shape == (1, 3, 224, 224)
    with pytest.raises(EdgekitError):
        preprocess(np.zeros((4, 4, 2), dtype=np.uint8))
