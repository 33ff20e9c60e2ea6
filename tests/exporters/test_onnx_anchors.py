"""ptq-int8's ONNX QDQ file carries the pt2e program's activation ranges (one calibration, two formats)."""

from __future__ import annotations

import numpy as np
import onnx
import torch
import torchao.quantization.pt2e  # noqa: F401  (registers the quantized_decomposed ops)
from onnx import numpy_helper
from onnx_tiny_models import evaluation

from edgekit.evaluate import sqnr_db
from edgekit.exporters.verify import onnx_session

Q_TENSOR = torch.ops.quantized_decomposed.quantize_per_tensor.default


def _activation_scales(path) -> list[float]:
    model = onnx.load(str(path))
    constants = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    weights = {init.name for init in model.graph.initializer}
    return [
        float(constants[node.input[1]])
        for node in model.graph.node
        if node.op_type == "QuantizeLinear" and node.input[0] not in weights and constants[node.input[1]].size == 1
    ]


def test_every_activation_range_is_the_pt2e_programs(ptq_conv) -> None:
    quantized, export = ptq_conv
    pt2e = sorted({float(node.args[1]) for node in quantized.simulated.graph.nodes if node.target == Q_TENSOR})
    onnx_scales = _activation_scales(export.main.path)
    assert export.quantization["ranges_from_pt2e"] >= 4  # input, two conv outputs, pooled, logits
    assert onnx_scales, "the QDQ graph quantizes activations"
    for scale in onnx_scales:  # none left to onnxruntime's own calibration
        assert min(abs(scale - s) / s for s in pt2e) < 1e-6, f"scale {scale} is not one of the pt2e program's"


def test_onnx_file_matches_the_simulated_model(ptq_conv) -> None:
    quantized, export = ptq_conv
    feed = evaluation(quantized)
    with torch.no_grad():
        simulated = quantized.simulated(**{k: torch.from_numpy(v) for k, v in feed.items()}).numpy()
    runtime = onnx_session(export.main.path).run(None, feed)[0]
    # same grid everywhere; only integer-kernel rounding of the requantization differs
    assert sqnr_db(simulated, runtime) > 35.0
    assert np.mean(simulated.argmax(-1) == runtime.argmax(-1)) == 1.0
