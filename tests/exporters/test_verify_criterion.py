"""The verification criterion (exporters.verify.judge): strict against the simulated model, or
"no further from float than the simulated model" for integer recipes, which still catches real
bugs (a wrong scale, a wrong layout) in a real onnxruntime QDQ file."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper
from onnx_tiny_models import evaluation, torch_output

from edgekit import recipes
from edgekit.exporters.verify import compare, judge, onnx_session
from edgekit.recipes import VerifyConfig

STRICT = VerifyConfig(min_sqnr_db=25.0, min_top1_agreement=0.95)
FLOAT_GAP = VerifyConfig(min_sqnr_db=10.0, float_gap_db=3.0, max_top1_drop=0.125)


def _result(float_out: np.ndarray, simulated: np.ndarray, runtime: np.ndarray) -> dict:
    return {
        "runtime_vs_simulated": compare(simulated, runtime, "classifier"),
        "runtime_vs_float": compare(float_out, runtime, "classifier"),
        "simulated_vs_float": compare(float_out, simulated, "classifier"),
    }


def _noisy(reference: np.ndarray, db: float, seed: int) -> np.ndarray:
    """``reference`` plus independent noise ``db`` below its power."""
    noise = np.random.default_rng(seed).normal(size=reference.shape)
    power = np.mean(reference**2) / 10 ** (db / 10)
    return reference + noise * np.sqrt(power / np.mean(noise**2))


def test_runtime_as_far_from_float_as_the_simulation_passes_only_with_the_float_gap():
    float_out = np.random.default_rng(0).normal(size=(64, 10)) * 3
    simulated = _noisy(float_out, 17.0, 1)
    runtime = _noisy(simulated, 18.0, 2)  # tie-breaking noise as large as the quantization error
    result = _result(float_out, simulated, runtime)
    assert judge(result, FLOAT_GAP) == []
    assert any("SQNR" in failure for failure in judge(result, STRICT))  # 18 dB < 25 dB against simulated


def test_float_gap_fails_a_runtime_much_further_from_float():
    float_out = np.random.default_rng(0).normal(size=(64, 10)) * 3
    simulated = _noisy(float_out, 20.0, 1)
    runtime = _noisy(simulated, 12.0, 2)  # passes the 10 dB floor, but 8 dB worse than simulated
    failures = judge(_result(float_out, simulated, runtime), FLOAT_GAP)
    assert any("from float" in failure and "allowed gap 3.0 dB" in failure for failure in failures)


def test_floor_top1_drop_and_non_finite_outputs():
    float_out = np.random.default_rng(0).normal(size=(8, 10))
    simulated = float_out.copy()
    runtime = float_out.copy()
    runtime[:2] = -runtime[:2]  # two of eight samples flip their class: drop 0.25 > 0.125
    failures = judge(_result(float_out, simulated, runtime), FLOAT_GAP)
    assert any("top-1 agreement with float" in failure for failure in failures)
    assert any("against the simulated model" in failure for failure in failures)  # 0 dB < the 10 dB floor
    runtime = float_out.copy()
    runtime[0, 0] = np.nan
    assert judge(_result(float_out, simulated, runtime), FLOAT_GAP) == ["the runtime output is not finite"]
    assert judge(_result(float_out, simulated, runtime), STRICT) == ["the runtime output is not finite"]


def test_ptq_int8_recipe_uses_the_float_gap():
    recipe = recipes.load("ptq-int8")
    assert recipe.verify.float_gap_db == 3.0 and recipe.verify.max_top1_drop == 0.125
    assert recipes.load("fp32").verify.float_gap_db is None  # float exports must match exactly


def _judge_file(bundle, path) -> list[str]:
    """The float-gap verdict on the ONNX file at ``path``, as ``pipeline.verify`` computes it."""
    feed = evaluation(bundle)
    (runtime,) = onnx_session(path).run(None, feed)
    float_out = torch_output(bundle, feed)
    simulated = torch_output(bundle.replace(module=bundle.simulated), feed)
    return judge(_result(float_out, simulated, runtime), FLOAT_GAP)


def _corrupted(path, tmp_path, change) -> str:
    """A copy of the QDQ file with ``change(initializers by name, first weight DequantizeLinear)`` applied."""
    model = onnx.load(str(path))
    initializers = {init.name: init for init in model.graph.initializer}
    weight_dq = next(
        node
        for node in model.graph.node
        if node.op_type == "DequantizeLinear"
        and node.input[0] in initializers
        and numpy_helper.to_array(initializers[node.input[0]]).ndim == 4
    )
    change(initializers, weight_dq)
    target = tmp_path / "corrupted.onnx"
    onnx.save_model(model, str(target))
    return str(target)


def _replace(initializer, array: np.ndarray) -> None:
    initializer.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), initializer.name))


def test_the_real_file_passes(ptq_conv):
    bundle, export = ptq_conv
    path = export.main.path
    assert _judge_file(bundle, path) == []


def test_a_wrong_weight_scale_fails(ptq_conv, tmp_path):
    bundle, export = ptq_conv
    path = export.main.path

    def double_scale(initializers, dq) -> None:
        scale = initializers[dq.input[1]]
        _replace(scale, numpy_helper.to_array(scale) * 2.0)

    assert _judge_file(bundle, _corrupted(path, tmp_path, double_scale))


def test_a_wrong_weight_layout_fails(ptq_conv, tmp_path):
    bundle, export = ptq_conv
    path = export.main.path

    def transpose_kernels(initializers, dq) -> None:  # [out, in, kh, kw] read as [out, in, kw, kh]
        weight = initializers[dq.input[0]]
        _replace(weight, numpy_helper.to_array(weight).transpose(0, 1, 3, 2))

    assert _judge_file(bundle, _corrupted(path, tmp_path, transpose_kernels))
