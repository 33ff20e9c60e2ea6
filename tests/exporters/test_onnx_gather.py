"""A Gather on a per-channel-quantized table: onnxruntime's quantizer leaves it a Q/DQ pair that
cannot run; ``float_gather_outputs`` removes it and the graph runs, float after the Gather."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekit.exporters.onnx import float_gather_outputs
from edgekit.runtime.backends import open_onnx_session

ROWS, WIDTH = 5, 4


def _graph(path) -> np.ndarray:
    """ids -> Gather(DQ(table, per-row scales)) -> Q/DQ with the table's scales -> Add -> y."""
    rng = np.random.default_rng(0)
    table = rng.integers(-100, 100, (ROWS, WIDTH)).astype(np.int8)
    scales = rng.uniform(0.01, 0.1, ROWS).astype(np.float32)
    initializers = [
        numpy_helper.from_array(table, "table_q"),
        numpy_helper.from_array(scales, "table_scale"),
        numpy_helper.from_array(np.zeros(ROWS, np.int8), "table_zero"),
        numpy_helper.from_array(np.ones(WIDTH, np.float32), "one"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["table_q", "table_scale", "table_zero"], ["table"], axis=0),
        helper.make_node("Gather", ["table", "ids"], ["rows"], name="gather"),
        helper.make_node("QuantizeLinear", ["rows", "table_scale", "table_zero"], ["rows_q"], name="rows_q"),
        helper.make_node("DequantizeLinear", ["rows_q", "table_scale", "table_zero"], ["rows_dq"], name="rows_dq"),
        helper.make_node("Add", ["rows_dq", "one"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes,
        "tied-gather",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, WIDTH])],
        initializers,
    )
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))
    return table.astype(np.float32) * scales[:, None]


def test_per_channel_gather_output_runs_float_after_the_rewrite(tmp_path) -> None:
    path = tmp_path / "model.onnx"
    dequantized = _graph(path)
    ids = np.array([[4, 0, 2]], dtype=np.int64)
    with pytest.raises(Exception, match="per axis quantization"):
        open_onnx_session(path).run(None, {"ids": ids})
    assert float_gather_outputs(path) == 1
    (y,) = open_onnx_session(path).run(None, {"ids": ids})
    np.testing.assert_allclose(y[0], dequantized[[4, 0, 2]] + 1.0, rtol=1e-6)
    assert {node.op_type for node in onnx.load(str(path)).graph.node} == {"DequantizeLinear", "Gather", "Add"}
    assert float_gather_outputs(path) == 0  # nothing left to rewrite
