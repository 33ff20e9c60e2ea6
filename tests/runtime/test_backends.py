"""The edge runtime's onnxruntime backend."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgekit.runtime.backends import OnnxBackend


def test_onnx_sessions_use_exact_x64_int8_kernels(tmp_path) -> None:
    """Without VNNI, onnxruntime's default u8s8 kernels saturate; the runtime asks for the exact path."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    path = tmp_path / "relu.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))
    backend = OnnxBackend(path)
    assert backend.session.get_session_options().get_session_config_entry("session.x64quantprecision") == "1"
    assert backend.run({"x": np.array([-1.0, 2.0], np.float32)})["y"].tolist() == [0.0, 2.0]
