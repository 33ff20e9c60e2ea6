"""The exported HiRED encoder: its CLS rows feed the runtime's selection, which equals torch's."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from edgekit.runtime.hired import ENCODER_OUTPUTS, HiredEncoder, HiredSettings
from edgekit.vlm import hired as th
from edgekit.vlm.export import export_hired_encoder


@pytest.fixture(scope="module")
def exported(tmp_path_factory, make_tiny_vit):
    vit = make_tiny_vit(layers=4, image=16, patch=4)
    out = tmp_path_factory.mktemp("hired-encoder")
    export_hired_encoder(vit, out, image_size=16)
    return vit, out


def test_export_carries_the_cls_rows(exported) -> None:
    _, out = exported
    model = onnx.load(str(out / "model.onnx"))
    assert [o.name for o in model.graph.output] == list(ENCODER_OUTPUTS)
    config = json.loads((out / "hired.json").read_text())
    assert config["patch_grid"] == [4, 4] and (config["early_layer"], config["late_layer"]) == (0, 3)


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.4, 1.0])
def test_runtime_selection_on_the_export_equals_torch(exported, ratio: float) -> None:
    vit, out = exported
    torch.manual_seed(5)
    pixels = torch.randn(5, 3, 16, 16)  # a full image + 2x2 sub-images (another partition count than traced)
    encoder = HiredEncoder(out)
    features, kept = encoder(pixels.numpy(), (2, 2), ratio)
    module = th.ClsAttentionViT(vit)
    with torch.no_grad():
        ref_features, early, late = module(pixels)
    graph = encoder.encode(pixels.numpy())
    np.testing.assert_allclose(graph["cls_attention_late"], late.numpy(), atol=1e-5)
    expected = th.select(early[0], late, (4, 4), (2, 2), HiredSettings(ratio=ratio))
    assert [k.tolist() for k in kept] == [k.tolist() for k in expected]
    np.testing.assert_allclose(features, th.gather(ref_features, expected).numpy(), atol=1e-4)
