"""check() on hand-built op summaries, and on a real onnxruntime-quantized QDQ model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekit.devices.check import check, judge
from edgekit.devices.ops import OpStat
from edgekit.errors import EdgekitError

MiB = 2**20


def qdq_graph(act_bits: int = 8, norm_bits: int = 16) -> list[OpStat]:
    """An all-integer transformer-ish block as an onnxruntime QDQ export would summarise it."""
    return [
        OpStat("QuantizeLinear", 3, True, act_bits, None, 0.0, 3e4),
        OpStat("DequantizeLinear", 9, True, act_bits, None, 0.0, 9e4),
        OpStat("LayerNormalization", 2, True, norm_bits, 8, 4e5, 8e4),
        OpStat("MatMul", 6, True, act_bits, 8, 2.4e8, 1.2e6),
        OpStat("Softmax", 1, True, 16, None, 5e4, 2e4),
        OpStat("Add", 2, True, act_bits, None, 2e4, 6e4),
        OpStat("Relu", 1, True, act_bits, None, 1e4, 2e4),
        OpStat("Reshape", 4, True, act_bits, None, 0.0, 4e4),
    ]


def test_all_integer_qdq_graph_passes_on_snapdragon_with_full_integer_coverage() -> None:
    result = check(qdq_graph(), 3 * MiB, MiB, "snapdragon-8gen3-npu", "onnx-qdq")
    assert result.passed, result.reasons
    assert result.format_ok
    assert result.integer_coverage_count == 1.0 and result.integer_coverage_flops == 1.0
    assert result.unsupported == [] and result.rejected == [] and result.dequantized == []
    by_type = {op.op_type: op for op in result.ops}
    assert by_type["MatMul"].op_class == "matmul" and by_type["MatMul"].runs_as == "int8"
    assert by_type["Softmax"].runs_as == "int16"
    assert by_type["MatMul"].required == "int a8|a16 w4|w8|w16; no float"


def test_float_softmax_fails_on_ethos_and_is_named() -> None:
    ops = qdq_graph(norm_bits=8)
    ops[4] = OpStat("Softmax", 1, False, None, None, 5e4, 4e4)
    result = check(ops, MiB, 256 * 1024, "arm-ethos-u55", "tflite")
    assert not result.passed
    assert result.rejected == ["Softmax x1"]
    assert any("Softmax" in reason and "float softmax is not executed" in reason for reason in result.reasons)
    softmax = next(op for op in result.ops if op.op_type == "Softmax")
    assert softmax.status == "rejected" and not softmax.accepted and softmax.runs_as is None
    # the host Cortex-M55 runs float softmax: with fallback allowed it passes, with a warning
    relaxed = check(ops, MiB, 256 * 1024, "arm-ethos-u55", "tflite", allow_fallback=True)
    assert relaxed.passed and relaxed.fallback == ["Softmax x1"]
    assert any("arm-cortex-m55" in w for w in relaxed.warnings)


def test_16_bit_norm_is_accepted_on_snapdragon_but_not_on_ethos() -> None:
    norm = OpStat("LayerNormalization", 1, True, 16, 8, 1e5, 1e4)
    assert judge(norm, _profile("snapdragon-8gen3-npu")).status == "ok"
    verdict = judge(norm, _profile("arm-ethos-u55"))
    assert verdict.status == "rejected"
    assert "16-bit activations not executed for norm (takes a8)" in verdict.reason
    eight = OpStat("LayerNormalization", 1, True, 8, 8, 1e5, 1e4)
    assert judge(eight, _profile("arm-ethos-u55")).status == "ok"


def test_memory_fit_failures() -> None:
    ethos = check(qdq_graph(norm_bits=8), 40 * MiB, 3 * MiB, "arm-ethos-u55", "tflite")
    assert not ethos.memory.fits and not ethos.passed
    assert "40.0 MiB > 32.0 MiB weight storage" in ethos.memory.reason
    assert "> 2.0 MiB working memory" in ethos.memory.reason
    phone = check(qdq_graph(), 5 * 2**30, 2 * 2**30, "snapdragon-8gen3-npu", "onnx-qdq")
    assert not phone.passed and any(r.startswith("does not fit in memory") for r in phone.reasons)
    fits = check(qdq_graph(), 5 * 2**30, None, "snapdragon-8gen3-npu", "onnx-qdq")
    assert fits.memory.fits and "activations not measured" in fits.memory.reason


def test_format_and_unknown_ops() -> None:
    result = check([OpStat("Erf", 2, True, 8)], MiB, MiB, "arm-ethos-u55", "onnx-qdq")
    assert not result.format_ok and result.unsupported == ["Erf x2"]
    assert any("format 'onnx-qdq' is not accepted (accepts tflite, pte)" in r for r in result.reasons)
    mystery = judge(OpStat("FancyOp", 1, False), _profile("x86-cpu-onnxruntime"))
    assert mystery.status == "unsupported" and "op class table" in mystery.reason
    loop = judge(OpStat("Loop", 1, False), _profile("snapdragon-8gen3-npu"))
    assert loop.status == "unsupported"
    with pytest.raises(EdgekitError, match="unknown model format 'safetensors'"):
        check([], MiB, None, "x86-cpu-onnxruntime", "safetensors")


def test_16_bit_matmul_is_a_float_island_on_onnxruntime_cpu() -> None:
    ops = [OpStat("MatMul", 4, True, 16, 8, 1e9, 1e6), OpStat("MatMul", 4, True, 8, 8, 1e9, 1e6)]
    result = check(ops, MiB, MiB, "x86-cpu-onnxruntime", "onnx-qdq")
    assert result.passed  # it runs ...
    assert result.dequantized == ["MatMul x4"]  # ... but not in integer, and it says so
    assert result.integer_coverage_count == 0.5 and result.integer_coverage_flops == 0.5
    assert result.ops[0].runs_as == "fp32"


def test_executorch_names_and_delegation() -> None:
    ops = [
        OpStat("executorch_call_delegate", 1, False, delegated=None),
        OpStat("aten.linear.default", 3, True, 8, 8, 3e6, 3e4, delegated=True),
        OpStat("aten.native_layer_norm.default", 1, False, None, None, 1e4, 4e3, delegated=True),
        OpStat("aten.gelu.default", 1, False, None, None, 1e4, 4e3, delegated=False),
    ]
    xnnpack = check(ops, MiB, MiB, "arm64-cpu-xnnpack", "pte")
    assert xnnpack.passed  # XNNPACK runs float norm/gelu; undelegated ops use portable CPU kernels
    assert xnnpack.integer_coverage_count == pytest.approx(3 / 5)
    apu = check(ops, MiB, MiB, "mediatek-dimensity9300-apu", "pte")
    gelu = next(op for op in apu.ops if op.op_type == "aten.gelu.default")
    assert gelu.status == "undelegated" and not apu.passed
    assert apu.unsupported == ["aten.gelu.default x1"]


def test_float_ops_on_the_neural_engine_run_in_fp16() -> None:
    result = check([OpStat("Conv", 5, False, None, None, 1e9, 1e6)], MiB, MiB, "apple-a17pro-ane", "mlpackage")
    assert result.passed and result.ops[0].runs_as == "fp16"
    assert result.integer_coverage_count == 0.0


def test_as_dict_is_json_and_rows_line_up() -> None:
    result = check(qdq_graph(), 3 * MiB, MiB, "snapdragon-8gen3-npu", "onnx-qdq")
    data = json.loads(json.dumps(result.as_dict()))
    assert data["passed"] is True and data["ops"][3]["accepted"] is True
    assert data["ops"][3]["integer_run"] is True and data["memory"]["fits"] is True
    rows = result.rows()
    assert rows[0][0] == "op" and len(rows) == len(result.ops) + 1
    assert all(len(row) == len(rows[0]) for row in rows)
    assert dict(result.summary())["verdict"] == "PASS"


# ---- a real QDQ model, quantized by onnxruntime ------------------------------------------------


def _float_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "conv_w"),
        numpy_helper.from_array(rng.standard_normal((4, 5)).astype(np.float32), "fc_w"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv_w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("MatMul", ["f", "fc_w"], ["m"]),
        helper.make_node("Softmax", ["m"], ["y"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


_BITS = {TensorProto.UINT8: 8, TensorProto.INT8: 8, TensorProto.UINT16: 16, TensorProto.INT16: 16}


def _op_stats(model: onnx.ModelProto) -> list[OpStat]:
    """Minimal QDQ reader for the test: an op is integer when all its inputs come from DQ nodes."""
    graph = model.graph
    dtype = {t.name: t.data_type for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    stats = []
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            stats.append(OpStat(node.op_type, 1, True))
            continue
        sources = [producer.get(name) for name in node.input if name]
        integer = all(s is not None and s.op_type == "DequantizeLinear" for s in sources)
        acts = [_BITS[dtype[s.input[2]]] for s in sources if s and s.input[0] not in dtype and len(s.input) > 2]
        weights = [_BITS.get(dtype[s.input[0]]) for s in sources if s and s.input[0] in dtype]
        stats.append(OpStat(node.op_type, 1, integer, max(acts, default=None), max(weights, default=None)))
    return stats


# onnxruntime's CPU kernels for these are 8-bit only: at 16 bits they run DQ -> float op -> Q
SIXTEEN_ON_CPU = ["Conv x1", "GlobalAveragePool x1", "MatMul x1", "Softmax x1"]


@pytest.mark.parametrize(("activation_bits", "x86_dequantized"), [(8, []), (16, SIXTEEN_ON_CPU)])
def test_real_onnxruntime_qdq_model(tmp_path, activation_bits: int, x86_dequantized: list[str]) -> None:
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(1)
            self.items = iter([{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.items, None)

    src, dst = tmp_path / "float.onnx", tmp_path / "qdq.onnx"
    onnx.save(_float_model(), src)
    quantize_static(
        str(src),
        str(dst),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt16 if activation_bits == 16 else QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    probs = ort.InferenceSession(str(dst)).run(None, {"x": np.ones((1, 3, 8, 8), np.float32)})[0]
    assert probs.shape == (1, 5) and abs(float(probs.sum()) - 1.0) < 0.05  # a real, runnable QDQ file
    ops = _op_stats(onnx.load(dst))
    assert {op.op_type for op in ops} >= {"Conv", "MatMul", "Softmax", "QuantizeLinear", "DequantizeLinear"}
    snapdragon = check(ops, dst.stat().st_size, 4096, "snapdragon-8gen3-npu", "onnx-qdq")
    assert snapdragon.passed, snapdragon.reasons
    assert snapdragon.integer_coverage_count == 1.0
    conv = next(op for op in snapdragon.ops if op.op_type == "Conv")
    assert (conv.activation_bits, conv.weight_bits) == (activation_bits, 8)
    x86 = check(ops, dst.stat().st_size, 4096, "x86-cpu-onnxruntime", "onnx-qdq")
    assert x86.passed and x86.dequantized == x86_dequantized


def _profile(name: str):
    from edgekit.devices import load_profile

    return load_profile(name)
