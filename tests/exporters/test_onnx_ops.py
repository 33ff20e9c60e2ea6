"""onnx_op_stats: the per-op table device checks read."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekit.errors import EdgekitError
from edgekit.exporters.onnx_ops import QDQ_OPS, float_islands, onnx_op_stats


def _rows(stats, op_type):
    return [row for row in stats if row.op_type == op_type]


def test_fp32_conv_net_flops_and_bytes(exported):
    _, export = exported("conv", "fp32")
    stats = onnx_op_stats(export.main.path, {"image": (2, 3, 16, 16)})
    (conv,) = _rows(stats, "Conv")
    # conv1: 2*8*16*16 outputs x 3*3*3 MACs; conv2: 2*16*8*8 outputs x 8*3*3 MACs; 2 FLOPs per MAC
    assert conv.count == 2 and conv.flops == 2 * (2 * 8 * 16 * 16 * 27 + 2 * 16 * 8 * 8 * 72)
    (gemm,) = _rows(stats, "Gemm")
    assert gemm.flops == 2 * 2 * 10 * 16
    # conv1 moves input 2*3*16*16, weight 8*3*3*3, bias 8, output 2*8*16*16 floats (+ conv2)
    conv1 = (2 * 3 * 16 * 16 + 8 * 27 + 8 + 2 * 8 * 16 * 16) * 4
    conv2 = (2 * 8 * 16 * 16 + 16 * 72 + 16 + 2 * 16 * 8 * 8) * 4
    assert conv.bytes_moved == conv1 + conv2
    assert not any(row.integer for row in stats)
    assert float_islands(stats) == stats
    assert not any(row.op_type in QDQ_OPS for row in stats)


def test_flops_follow_the_given_input_shape(exported):
    _, export = exported("conv", "fp32")
    one = sum(r.flops for r in onnx_op_stats(export.main.path, {"image": (1, 3, 16, 16)}))
    four = sum(r.flops for r in onnx_op_stats(export.main.path, {"image": (4, 3, 16, 16)}))
    assert four == 4 * one > 0


def test_qdq_conv_net_is_integer_and_moves_fewer_bytes(exported):
    _, fp32 = exported("conv", "fp32")
    _, q8 = exported("conv", "q8")
    shapes = {"image": (2, 3, 16, 16)}
    float_stats, int_stats = onnx_op_stats(fp32.main.path, shapes), onnx_op_stats(q8.main.path, shapes)
    (conv,) = _rows(int_stats, "Conv")
    assert conv.integer and conv.activation_bits == 8 and conv.weight_bits == 8
    assert conv.flops == _rows(float_stats, "Conv")[0].flops
    assert conv.bytes_moved < 0.35 * _rows(float_stats, "Conv")[0].bytes_moved
    assert not float_islands(int_stats)
    plumbing = [row for row in int_stats if row.op_type in QDQ_OPS]
    assert plumbing and all(row.integer and row.flops == 0 and row.bytes_moved == 0 for row in plumbing)
    weight_dq = [row for row in plumbing if row.weight_bits is not None]
    assert {row.weight_bits for row in weight_dq} == {8, 32}  # int8 weights, int32 biases
    assert sum(row.count for row in weight_dq) == 6  # 3 weights + 3 biases


def test_16bit_activation_bits(exported):
    _, q16 = exported("block", "q16")
    stats = onnx_op_stats(q16.main.path, {"tokens": (2, 6, 32)})
    compute = [row for row in stats if row.op_type in ("MatMul", "Gemm", "Softmax", "LayerNormalization")]
    assert compute and all(row.integer and row.activation_bits == 16 for row in compute)
    matmuls = _rows(stats, "MatMul")
    # activation x activation: q @ k^T [2,6,32]x[2,32,6] and p @ v [2,6,6]x[2,6,32]
    assert sum(row.flops for row in matmuls if row.weight_bits is None) == 2 * (2 * 6 * 6 * 32) * 2
    # the Linear layers on [2,6,32] tokens: q, k, v, out (32->32), up (32->64), down (64->32)
    linear = 2 * 12 * (4 * 32 * 32 + 2 * 32 * 64)
    assert sum(row.flops for row in matmuls if row.weight_bits == 8) == linear


def test_float_op_between_qdq_is_reported_as_float(tmp_path):
    """A node fed by a DQ but writing a graph output directly is a float island."""
    scale = numpy_helper.from_array(np.array(0.1, dtype=np.float32), "scale")
    zero = numpy_helper.from_array(np.array(128, dtype=np.uint8), "zero")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "scale", "zero"], ["xd"]),
        helper.make_node("Relu", ["xd"], ["r"]),
        helper.make_node("QuantizeLinear", ["r", "scale", "zero"], ["rq"]),
        helper.make_node("DequantizeLinear", ["rq", "scale", "zero"], ["rd"]),
        helper.make_node("Sigmoid", ["rd"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [scale, zero],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))
    stats = onnx_op_stats(path)
    assert _rows(stats, "Relu")[0].integer and _rows(stats, "Relu")[0].activation_bits == 8
    (sigmoid,) = _rows(stats, "Sigmoid")
    assert not sigmoid.integer and sigmoid.activation_bits is None
    assert float_islands(stats) == [sigmoid]


def test_truncated_file_is_a_user_error(tmp_path, exported):
    _, export = exported("mlp", "fp32")
    data = export.main.path.read_bytes()
    broken = tmp_path / "model.onnx"
    broken.write_bytes(data[: len(data) // 3])
    with pytest.raises(EdgekitError, match="not a valid ONNX file"):
        onnx_op_stats(broken)
