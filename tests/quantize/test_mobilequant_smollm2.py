"""A 2-layer slice of the real SmolLM2-135M through the whole mobilequant-w8a8 recipe.

Calibration windows from the Wikipedia split, SmoothQuant init, end-to-end optimisation, folding,
QDQ export of prefill + decode, onnxruntime run, the learned ranges read back from the file, and
the Snapdragon NPU profile's integer coverage.
"""

from __future__ import annotations

import pytest
import torch
from mq_tiny import ids_from
from test_mobilequant_export import module_tensors, qdq_params

from edgekit import recipes
from edgekit.calibrate import calibration_inputs
from edgekit.evaluate import sqnr_db
from edgekit.models.bundle import ModelBundle
from edgekit.models.llama import CausalLMWithCache

pytestmark = pytest.mark.slow

onnx_exporter = pytest.importorskip("edgekit.exporters.onnx")


@pytest.fixture(scope="module")
def sliced() -> ModelBundle:
    from edgekit.models import smollm2

    bundle = smollm2.load()
    return bundle.replace(module=CausalLMWithCache(bundle.module.hf_model, num_layers=2).eval())


def test_two_layer_smollm2_through_the_recipe(sliced, tmp_path) -> None:
    from edgekit.devices.check import check
    from edgekit.exporters.onnx_ops import onnx_op_stats
    from edgekit.exporters.verify import onnx_session

    recipe = recipes.load("mobilequant-w8a8", {"samples": "4", "seq_len": "48", "epochs": "2", "batch_size": "2"})
    calib = calibration_inputs(sliced, None, recipe.settings.samples, recipe.settings.seq_len)
    quantized = recipe.transform_module().apply(sliced, calib, recipe.settings)
    facts = quantized.meta["mobilequant"]
    assert facts["steps"] == 4
    assert facts["mse_final"] < facts["mse_init"]  # the end-to-end objective improves on real weights

    result = onnx_exporter.export_onnx(quantized, tmp_path / "qdq", calib)
    prefill = result.graphs["prefill"].path
    floats = onnx_exporter.export_onnx(quantized.replace(quant=None), tmp_path / "fp32")
    params, tensors = qdq_params(prefill), module_tensors(floats.graphs["prefill"].path)
    for module_path, override in quantized.quant.overrides.items():
        scale, zero, bits = params[tensors[module_path]]
        assert (bits, zero) == (override.bits, override.zero_point), module_path
        assert scale == pytest.approx(override.scale, rel=1e-6), module_path

    ids = ids_from(calibration_inputs(sliced, None, 1, 40, split="eval")[0])
    logits = onnx_session(prefill).run(None, {"input_ids": ids.numpy()})[0]
    with torch.no_grad():
        simulated = quantized.simulated(ids).numpy()
    assert sqnr_db(simulated, logits) > 20.0

    size = sum(p.stat().st_size for p in (tmp_path / "qdq").iterdir())
    for role in ("prefill", "decode"):
        verdict = check(onnx_op_stats(result.graphs[role].path), size, None, "snapdragon-8gen3-npu", "onnx-qdq")
        assert verdict.passed, (role, verdict.reasons)
        assert verdict.integer_coverage_count == 1.0 and verdict.integer_coverage_flops == 1.0, role


def test_two_layer_smollm2_int8_only_runs_as_pte_with_its_learned_ranges(sliced, tmp_path) -> None:
    from edgekit.exporters.executorch import export_pte
    from edgekit.runtime.pte import PteProgram

    recipe = recipes.load("mobilequant-w8a8-int8only", {"samples": "4", "seq_len": "48", "epochs": "1"})
    calib = calibration_inputs(sliced, None, recipe.settings.samples, recipe.settings.seq_len)
    quantized = recipe.transform_module().apply(sliced, calib, recipe.settings)
    ids = ids_from(calibration_inputs(sliced, None, 1, 40, split="eval")[0])
    result = export_pte(quantized.replace(example_inputs={"input_ids": ids}), tmp_path)
    logits = PteProgram(result.path, ["input_ids"]).run({"input_ids": ids.numpy()})[0]
    with torch.no_grad():
        simulated = quantized.simulated(ids).numpy()
        folded_float = quantized.module(ids).numpy()
    assert sqnr_db(simulated, logits) > 20.0
    assert sqnr_db(simulated, logits) > sqnr_db(folded_float, logits)  # it runs the quantized model
