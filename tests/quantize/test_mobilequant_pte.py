"""MobileQuant through the ExecuTorch exporter: the int8-only model lowered to XNNPACK with its
learned ranges fixed (never observed again), run in the ExecuTorch runtime, agreeing with the
simulated model; 16-bit plans are refused with a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgekit.errors import EdgekitError
from edgekit.evaluate import sqnr_db
from edgekit.models.bundle import ModelBundle
from edgekit.quantize import mobilequant

executorch_exporter = pytest.importorskip("edgekit.exporters.executorch")

from mq_tiny import calib, tiny_llama  # noqa: E402

from edgekit.quantize.pt2e_fixed import fixed_range_program, module_output_nodes  # noqa: E402
from edgekit.runtime.pte import PteProgram  # noqa: E402

LENGTH = 16


def _bundle() -> ModelBundle:
    return ModelBundle(
        spec="test:tiny-llama",
        module=tiny_llama(),
        example_inputs={"input_ids": torch.randint(0, 101, (1, LENGTH))},
        task="causal-lm",
        output_names=["logits"],
        dynamic_axes={"input_ids": {1: "sequence"}},
    )


@pytest.fixture(scope="module")
def int8_only():
    data = calib(6, LENGTH)
    config = mobilequant.Config(int8_only=True, samples=6, seq_len=LENGTH, epochs=1, batch_size=3)
    return mobilequant.apply(_bundle(), data, config), data


def test_fixed_program_quantizes_each_site_at_its_learned_range(int8_only):
    quantized, _ = int8_only
    program = fixed_range_program(quantized.module, quantized.example_inputs, quantized.quant)
    outputs = module_output_nodes(program)
    prefix = "" if all(path in outputs for path in quantized.quant.overrides) else "model."
    quantize = torch.ops.quantized_decomposed.quantize_per_tensor.default
    for path, fixed in quantized.quant.overrides.items():
        node = outputs[prefix + path]
        (user,) = [u for u in node.users if u.target == quantize]
        scale, zero_point = user.args[1], user.args[2]
        assert scale == pytest.approx(fixed.scale, rel=1e-6)
        assert zero_point == fixed.zero_point - 128  # the uint8 grid as int8: same values
    assert "embed_tokens" in quantized.quant.overrides  # the lookup's output is a site like the others


def test_int8_only_pte_runs_in_executorch_and_matches_the_simulation(int8_only, tmp_path):
    quantized, data = int8_only
    result = executorch_exporter.export_pte(quantized, tmp_path)
    assert result.quantized
    ids = np.asarray(data[0]["input_ids"], dtype=np.int64)
    runtime = PteProgram(result.path, ["input_ids"]).run({"input_ids": ids})[0]
    with torch.no_grad():
        simulated = quantized.simulated.prefill(torch.as_tensor(ids))[0].numpy()
        float_logits = quantized.module.prefill(torch.as_tensor(ids))[0].numpy()
    to_simulated = sqnr_db(simulated, runtime)
    # the .pte computes the simulated model (its int8 kernels round once more per op)
    assert to_simulated > 25.0, to_simulated
    assert to_simulated > sqnr_db(float_logits, runtime) + 3.0
    assert result.delegation.delegated_ops > 0


def test_sixteen_bit_plan_is_refused_for_pte(tmp_path):
    data = calib(4, LENGTH)
    config = mobilequant.Config(samples=4, seq_len=LENGTH, epochs=0, learn=False)
    quantized = mobilequant.apply(_bundle(), data, config)
    with pytest.raises(EdgekitError, match="8-bit activations only.*int8-only"):
        executorch_exporter.export_pte(quantized, tmp_path)
    assert not (tmp_path / executorch_exporter.PTE_NAME).exists()
