"""ONNX export per op family, each with a QDQ twin, checked in real onnxruntime sessions.

In the spirit of onnxruntime's quantization op tests: count the Q/DQ nodes, check that the compute
ops run in integer, and bound the numeric error against torch.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnx_tiny_models import calibration, evaluation, torch_output

from edgekit.errors import EdgekitError
from edgekit.evaluate import sqnr_db
from edgekit.exporters.onnx import export_onnx, module_outputs, module_scopes
from edgekit.exporters.onnx_ops import QDQ_OPS, onnx_op_stats
from edgekit.exporters.verify import onnx_session
from edgekit.quantize.spec import QuantSpec, TensorOverride

FAMILIES = ["conv", "mlp", "block"]
# SQNR floors for 8-bit QDQ against torch on random inputs (observed: conv ~46, mlp ~40, block ~33 dB).
SQNR_FLOOR_8BIT = {"conv": 35.0, "mlp": 32.0, "block": 25.0}


def _run(export, feed):
    return onnx_session(export.main.path).run(None, feed)[0]


def _op_counts(path) -> Counter:
    return Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_matches_torch(exported, family):
    bundle, export = exported(family, "fp32")
    feed = evaluation(bundle)  # batch 8: the exported batch axis is dynamic
    np.testing.assert_allclose(_run(export, feed), torch_output(bundle, feed), atol=1e-5, rtol=1e-5)
    assert export.precision == "fp32" and export.exporter == "dynamo" and export.opset == 21
    (name,) = bundle.example_inputs
    assert export.inputs[0].name == name and export.inputs[0].shape[0] == "batch"
    assert export.outputs[0].name == "output" and export.outputs[0].shape[0] == "batch"
    assert not export.main.edge_quant
    assert not (_op_counts(export.main.path).keys() & QDQ_OPS)
    assert [p.name for p in export.files] == ["model.onnx"]


@pytest.mark.parametrize("family", FAMILIES)
def test_qdq8_runs_in_integer_and_stays_close(exported, family):
    bundle, export = exported(family, "q8")
    counts = _op_counts(export.main.path)
    compute = counts["Conv"] + counts["MatMul"] + counts["Gemm"]
    assert compute > 0
    # every compute op reads DQ'd activations and a DQ'd weight: at least 2 DQ per compute op,
    # and one Q per quantized activation tensor (DQ count >= Q count + weights)
    assert counts["DequantizeLinear"] >= 2 * compute
    assert counts["QuantizeLinear"] >= compute
    ((name, example),) = bundle.example_inputs.items()
    stats = onnx_op_stats(export.main.path, {name: (2, *example.shape[1:])})
    heavy = [row for row in stats if row.op_type in ("Conv", "MatMul", "Gemm")]
    assert heavy and all(row.integer and row.activation_bits == 8 for row in heavy)
    assert all(row.weight_bits == 8 for row in heavy if row.op_type in ("Conv", "Gemm"))
    feed = evaluation(bundle)
    assert sqnr_db(torch_output(bundle, feed), _run(export, feed)) > SQNR_FLOOR_8BIT[family]
    assert export.precision == "qdq" and export.quantization["activation_bits"] == 8
    edge = export.main.edge_quant
    assert edge[export.inputs[0].name].dtype == "uint8" and edge["output"].dtype == "uint8"


def _qdq_types(path) -> set[str]:
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    types = set()
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and len(node.input) > 2 and node.input[2] in inits:
            types.add(numpy_helper.to_array(inits[node.input[2]]).dtype.name)
    return types


# conv's error is dominated by its 8-bit weights; the block's by its activations
@pytest.mark.parametrize(("family", "gain_db"), [("conv", 1.0), ("block", 3.0)])
def test_16bit_activations_are_uint16_and_more_accurate(exported, family, gain_db):
    bundle, q8 = exported(family, "q8")
    _, q16 = exported(family, "q16")
    assert _qdq_types(q16.main.path) == {"uint16"}
    assert _qdq_types(q8.main.path) == {"uint8"}
    model = onnx.load(str(q16.main.path))
    assert {n.domain for n in model.graph.node} == {""}  # standard opset-21 Q/DQ, no contrib ops
    assert {o.domain for o in model.opset_import} == {""}
    feed = evaluation(bundle)
    reference = torch_output(bundle, feed)
    assert sqnr_db(reference, _run(q16, feed)) > sqnr_db(reference, _run(q8, feed)) + gain_db


def test_sixteen_bit_ops_mix_precisions(tmp_path, bundles):
    bundle = bundles["block"].replace(quant=QuantSpec(sixteen_bit_ops=frozenset({"Softmax"})))
    export = export_onnx(bundle, tmp_path, calibration(bundle))
    stats = onnx_op_stats(export.main.path, {"tokens": (2, 6, 32)})
    softmax = [row for row in stats if row.op_type == "Softmax"]
    assert softmax and all(row.integer and row.activation_bits == 16 for row in softmax)
    # the projections stay 8-bit; the probabilities' consumer (p @ v) reads them at 16 bits
    assert {row.activation_bits for row in stats if row.op_type == "MatMul" and row.weight_bits} == {8}
    assert 16 in {row.activation_bits for row in stats if row.op_type == "MatMul" and not row.weight_bits}
    assert _qdq_types(export.main.path) == {"uint8", "uint16"}
    feed = evaluation(bundle)
    assert sqnr_db(torch_output(bundle, feed), _run(export, feed)) > SQNR_FLOOR_8BIT["block"]


def test_float_ops_stay_float_and_are_reported(tmp_path, bundles, exported):
    """Norms and adds (residuals, biases) kept float: the float chain carries no Q/DQ inside.

    A lone float op between quantized neighbours would still read DQ and feed Q, which an NPU
    runs in integer; a chain of float ops is a real float island, and the table says so.
    """
    bundle = bundles["block"].replace(quant=QuantSpec(float_ops=frozenset({"LayerNormalization", "Add"})))
    export = export_onnx(bundle, tmp_path, calibration(bundle))
    stats = onnx_op_stats(export.main.path, {"tokens": (2, 6, 32)})
    assert {row.op_type for row in stats if not row.integer} == {"LayerNormalization", "Add"}
    assert all(row.integer for row in stats if row.op_type == "MatMul")
    feed = evaluation(bundle)
    reference = torch_output(bundle, feed)
    _, full = exported("block", "q8")
    assert sqnr_db(reference, _run(export, feed)) > sqnr_db(reference, _run(full, feed))


def _q_params(path, tensor: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(scale, zero point) of every Q reading ``tensor`` and every DQ of those Qs' outputs."""
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    found = []
    q_outputs = set()
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] == tensor:
            found.append((inits[node.input[1]], inits[node.input[2]]))
            q_outputs.add(node.output[0])
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in q_outputs:
            found.append((inits[node.input[1]], inits[node.input[2]]))
    return found


def test_tensor_overrides_are_written_exactly(tmp_path, bundles, exported):
    _, fp32 = exported("mlp", "fp32")
    graph = onnx.load(str(fp32.main.path)).graph
    relu_out = next(n.output[0] for n in graph.node if n.op_type == "Relu")
    scale = 0.0123456789  # not representable in float32: must arrive as float32(scale), bit for bit
    plan = QuantSpec(
        overrides={
            relu_out: TensorOverride(bits=8, scale=scale, zero_point=3),
            "fc2": TensorOverride(bits=16, scale=0.00042, zero_point=30000),  # a module path: its output
        }
    )
    bundle = bundles["mlp"].replace(quant=plan)
    export = export_onnx(bundle, tmp_path, calibration(bundle))
    params = _q_params(export.main.path, relu_out)
    assert len(params) >= 2
    for got_scale, got_zero in params:
        assert got_scale.dtype == np.float32 and got_scale.item() == np.float32(scale)
        assert got_zero.dtype == np.uint8 and got_zero.item() == 3
    exported_graph = onnx.load(str(fp32.main.path))
    fc2_out = module_outputs(exported_graph, module_scopes(exported_graph))["fc2"]
    fc2 = _q_params(export.main.path, fc2_out)
    assert fc2 and all(s.item() == np.float32(0.00042) and z.dtype == np.uint16 and z.item() == 30000 for s, z in fc2)
    assert sorted(export.quantization["fixed_overrides"]) == sorted({relu_out, fc2_out})
    assert np.isfinite(_run(export, evaluation(bundle))).all()


def test_unknown_override_name_is_a_user_error(tmp_path, bundles):
    plan = QuantSpec(overrides={"no.such.tensor": TensorOverride(bits=8, scale=0.1, zero_point=0)})
    bundle = bundles["mlp"].replace(quant=plan)
    with pytest.raises(EdgekitError, match="no.such.tensor"):
        export_onnx(bundle, tmp_path / "out", calibration(bundle))
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_qdq_without_calibration_data_is_a_user_error(tmp_path, bundles):
    with pytest.raises(EdgekitError, match="calibration"):
        export_onnx(bundles["mlp"].replace(quant=QuantSpec()), tmp_path, None)


def test_per_channel_modules_keep_per_channel_weights(tmp_path, bundles):
    plan = QuantSpec(weight_per_channel=False, per_channel_modules=("fc2",))
    bundle = bundles["mlp"].replace(quant=plan)
    export = export_onnx(bundle, tmp_path, calibration(bundle))
    model = onnx.load(str(export.main.path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    weight_scales = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0].endswith("weight_quantized"):
            weight_scales[node.input[0]] = inits[node.input[1]].size
    assert weight_scales["fc2.weight_quantized"] == 64
    assert weight_scales["fc1.weight_quantized"] == 1 and weight_scales["head.weight_quantized"] == 1


def test_int4_weights_run_on_cpu(tmp_path, bundles, exported):
    bundle = bundles["mlp"].replace(quant=QuantSpec(weight_bits=4))
    export = export_onnx(bundle, tmp_path, calibration(bundle))
    stats = onnx_op_stats(export.main.path, {"features": (4, 32)})
    assert {row.weight_bits for row in stats if row.op_type == "Gemm"} == {4}
    feed = evaluation(bundle)
    reference = torch_output(bundle, feed)
    _, int8 = exported("mlp", "q8")
    assert 10.0 < sqnr_db(reference, _run(export, feed)) < sqnr_db(reference, _run(int8, feed))


def test_percentile_calibration(tmp_path, bundles):
    bundle = bundles["conv"].replace(quant=QuantSpec(calibration="percentile"))
    export = export_onnx(bundle, tmp_path, calibration(bundle))
    assert export.quantization["calibration"] == "percentile"
    feed = evaluation(bundle)
    assert sqnr_db(torch_output(bundle, feed), _run(export, feed)) > 20.0


def test_failed_export_leaves_out_dir_untouched(tmp_path, bundles):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    bundle = bundles["mlp"].replace(quant=QuantSpec())
    bad = [{"wrong_name": np.zeros((1, 32), np.float32)}]
    with pytest.raises(EdgekitError, match="wrong_name"):
        export_onnx(bundle, out, bad)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".onnx-export-")]


def test_output_named_like_an_internal_op_still_loads(tmp_path):
    """The dynamo exporter names values after torch ops; an output called ``embedding`` used to collide."""
    import onnxruntime as ort
    import torch

    from edgekit.models.bundle import ModelBundle

    class Pool(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = torch.nn.Embedding(20, 8)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.table(input_ids).mean(1)

    torch.manual_seed(0)
    ids = torch.randint(0, 20, (1, 5))
    bundle = ModelBundle("test:pool", Pool().eval(), {"input_ids": ids}, "text-encoder", output_names=["embedding"])
    export = export_onnx(bundle, tmp_path)
    session = ort.InferenceSession(str(export.main.path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["embedding"]
    (got,) = session.run(None, {"input_ids": ids.numpy()})
    np.testing.assert_allclose(got, bundle.module(ids).detach().numpy(), atol=1e-6)
