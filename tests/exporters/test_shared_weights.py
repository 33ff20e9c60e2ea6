"""``save_sharing_weights``: one copy of each weight on disk, including a tied matrix in two layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgekit.exporters.onnx import save_sharing_weights
from edgekit.exporters.verify import onnx_session

VOCAB, WIDTH = 300, 40  # 48 KB: large enough to go to the shared file


def _model(nodes, inputs, outputs, initializers) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _embedding(table: np.ndarray) -> onnx.ModelProto:
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "k"])
    out = helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, "k", WIDTH])
    return _model(
        [helper.make_node("Gather", ["embed", "ids"], ["hidden"])],
        [ids],
        [out],
        [numpy_helper.from_array(table, "embed")],
    )


def _head(table: np.ndarray, name: str = "head_t") -> onnx.ModelProto:
    """What the exporter writes for a tied LM head: the table folded into its transpose."""
    hidden = helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, "k", WIDTH])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "k", VOCAB])
    folded = numpy_helper.from_array(np.ascontiguousarray(table.T), name)
    return _model([helper.make_node("MatMul", ["hidden", name], ["logits"])], [hidden], [out], [folded])


def _both(table: np.ndarray) -> onnx.ModelProto:
    """Embedding and head in one graph (a single-graph LM), each layout its own initializer."""
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "k"])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "k", VOCAB])
    nodes = [
        helper.make_node("Gather", ["embed", "ids"], ["hidden"]),
        helper.make_node("MatMul", ["hidden", "head_t"], ["logits"]),
    ]
    initializers = [
        numpy_helper.from_array(table, "embed"),
        numpy_helper.from_array(np.ascontiguousarray(table.T), "head_t"),
    ]
    return _model(nodes, [ids], [out], initializers)


def test_a_tied_matrix_in_two_layouts_is_written_once(tmp_path: Path) -> None:
    table = np.random.default_rng(0).standard_normal((VOCAB, WIDTH)).astype(np.float32)
    weights = save_sharing_weights(
        {"embed": _embedding(table), "head": _head(table), "both": _both(table)}, tmp_path, "weights.bin"
    )
    assert table.nbytes <= weights.stat().st_size < table.nbytes + 4096  # one copy (plus alignment)
    ids = np.array([[3, 299, 17]], dtype=np.int64)
    hidden = table[ids]
    np.testing.assert_array_equal(onnx_session(tmp_path / "embed.onnx").run(None, {"ids": ids})[0], hidden)
    np.testing.assert_allclose(
        onnx_session(tmp_path / "head.onnx").run(None, {"hidden": hidden})[0], hidden @ table.T, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        onnx_session(tmp_path / "both.onnx").run(None, {"ids": ids})[0], hidden @ table.T, rtol=1e-5, atol=1e-5
    )
    head = onnx.load(str(tmp_path / "head.onnx"), load_external_data=False)
    assert [node.op_type for node in head.graph.node] == ["Transpose", "MatMul"]
    both = onnx.load(str(tmp_path / "both.onnx"), load_external_data=False)
    assert [init.name for init in both.graph.initializer] == ["embed"]  # the head reads the Gather's table


def test_a_matrix_that_only_looks_transposed_is_kept(tmp_path: Path) -> None:
    generator = np.random.default_rng(1)
    table = generator.standard_normal((VOCAB, WIDTH)).astype(np.float32)
    other = generator.standard_normal((VOCAB, WIDTH)).astype(np.float32)  # same shape, other values
    weights = save_sharing_weights({"embed": _embedding(table), "head": _head(other)}, tmp_path, "weights.bin")
    assert weights.stat().st_size >= 2 * table.nbytes
    hidden = np.ones((1, 2, WIDTH), dtype=np.float32)
    np.testing.assert_allclose(
        onnx_session(tmp_path / "head.onnx").run(None, {"hidden": hidden})[0], hidden @ other.T, rtol=1e-5, atol=1e-4
    )


def test_square_int4_weights_are_stored_each_as_is(tmp_path: Path) -> None:
    """Packed int4 bytes (two values per byte) are not a matrix to transpose; W4A8 has square ones."""
    side = 64
    generator = np.random.default_rng(2)
    weights = [generator.integers(-8, 8, (side, side)).astype(np.int8) for _ in range(2)]
    weights[1] = np.ascontiguousarray(weights[0].T)  # a transposed twin: int4 keeps both copies
    initializers = [
        helper.make_tensor(f"w{i}", TensorProto.INT4, [side, side], w.flatten().tolist()) for i, w in enumerate(weights)
    ]
    scale = numpy_helper.from_array(np.array(0.5, dtype=np.float32), "scale")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, side])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, side])
    nodes = [
        helper.make_node("DequantizeLinear", ["w0", "scale"], ["d0"]),
        helper.make_node("DequantizeLinear", ["w1", "scale"], ["d1"]),
        helper.make_node("MatMul", ["x", "d0"], ["h"]),
        helper.make_node("MatMul", ["h", "d1"], ["y"]),
    ]
    save_sharing_weights({"int4": _model(nodes, [x], [y], [*initializers, scale])}, tmp_path, "weights.bin")
    value = np.random.default_rng(3).standard_normal((1, side)).astype(np.float32)
    got = onnx_session(tmp_path / "int4.onnx").run(None, {"x": value})[0]
    want = value @ (0.5 * weights[0].astype(np.float32)) @ (0.5 * weights[1].astype(np.float32))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
