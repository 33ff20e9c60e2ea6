"""ExecuTorch exporter: real .pte files run in the real ExecuTorch runtime (XNNPACK)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgekit.errors import EdgekitError
from edgekit.evaluate import sqnr_db, top1_agreement
from edgekit.exporters.executorch import PteExport, export_pte
from edgekit.models.bundle import ModelBundle
from edgekit.quantize import ptq
from edgekit.runtime.pte import PteProgram


def _torch(module: torch.nn.Module, sample: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return module(**{k: torch.from_numpy(v) for k, v in sample.items()}).numpy()


def _ops(export: PteExport, family: str) -> list:
    return [op for op in export.ops if op.op_type.startswith(family + ".")]


@pytest.fixture(scope="module")
def conv_fp32(conv_bundle: ModelBundle, tmp_path_factory: pytest.TempPathFactory) -> PteExport:
    return export_pte(conv_bundle, tmp_path_factory.mktemp("conv_fp32"))


@pytest.fixture(scope="module")
def conv_int8(conv_bundle: ModelBundle, samples, tmp_path_factory) -> tuple[ModelBundle, PteExport]:
    quantized = ptq.apply(conv_bundle, samples(conv_bundle, 16, seed=10), ptq.Config())
    return quantized, export_pte(quantized, tmp_path_factory.mktemp("conv_int8"))


@pytest.fixture(scope="module")
def mlp_int8(mlp_bundle: ModelBundle, samples, tmp_path_factory) -> tuple[ModelBundle, PteExport]:
    quantized = ptq.apply(mlp_bundle, samples(mlp_bundle, 16, seed=11), ptq.Config())
    return quantized, export_pte(quantized, tmp_path_factory.mktemp("mlp_int8"))


def test_fp32_conv_matches_torch_in_executorch(conv_bundle: ModelBundle, conv_fp32: PteExport, samples) -> None:
    program = PteProgram(conv_fp32.path, conv_bundle.input_names)
    for sample in samples(conv_bundle, 4, seed=1):
        (out,) = program.run(sample)
        np.testing.assert_allclose(out, _torch(conv_bundle.module, sample), rtol=1e-5, atol=1e-5)
    assert conv_fp32.path.stat().st_size == conv_fp32.size_bytes
    assert [(t.name, t.dtype, t.shape) for t in conv_fp32.inputs] == [("image", "float32", [1, 1, 16, 16])]
    assert [(t.dtype, t.shape) for t in conv_fp32.outputs] == [("float32", [1, 10])]
    assert not conv_fp32.quantized and conv_fp32.static_shapes


def test_fp32_op_table_counts_flops_and_names_the_float_island(conv_fp32: PteExport) -> None:
    (conv,) = _ops(conv_fp32, "aten.convolution")
    assert conv.count == 3 and conv.delegated and not conv.integer
    # MACs per output x outputs: conv1 8*16*16 x 1*9, conv2 16*8*8 x 8*9, depthwise 16*8*8 x 1*9
    assert conv.flops == 2 * (2048 * 9 + 1024 * 72 + 1024 * 9)
    (linear,) = _ops(conv_fp32, "aten.linear")
    assert linear.delegated and linear.flops == 2 * 10 * 16
    # mean over (2, 3) without keepdim is outside XNNPACK: listed, with the partitioner's reason
    (mean,) = _ops(conv_fp32, "aten.mean")
    assert mean.delegated is False and not mean.integer
    assert conv_fp32.delegation.undelegated == {"aten.mean.dim": 1}
    assert "keepdim" in conv_fp32.delegation.reasons["aten.mean.dim"]
    assert conv_fp32.delegation.delegates == 2 and conv_fp32.delegation.backend == "XnnpackBackend"


def test_fp32_mlp_is_one_delegate_and_matches_torch(mlp_bundle: ModelBundle, samples, tmp_path) -> None:
    # a strided example input (as a permuted HWC image is) must still give a .pte for plain arrays
    strided = mlp_bundle.replace(example_inputs={"features": torch.randn(32, 4).t()})
    export = export_pte(strided, tmp_path)
    assert export.delegation.undelegated_ops == 0 and export.delegation.delegates == 1
    (out,) = PteProgram(export.path, mlp_bundle.input_names).run(samples(mlp_bundle, 1, seed=2)[0])
    reference = _torch(mlp_bundle.module, samples(mlp_bundle, 1, seed=2)[0])
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["conv_int8", "mlp_int8"])
def test_int8_pte_matches_the_simulated_model(name: str, samples, request: pytest.FixtureRequest) -> None:
    bundle, export = request.getfixturevalue(name)
    program = PteProgram(export.path, bundle.input_names)
    outs, refs = [], []
    for sample in samples(bundle, 8, seed=3):
        outs.append(program.run(sample)[0])
        refs.append(_torch(bundle.simulated, sample))
    outs, refs = np.concatenate(outs), np.concatenate(refs)
    assert sqnr_db(refs, outs) >= 35.0
    assert top1_agreement(outs, refs) == 1.0
    assert export.quantized


@pytest.mark.parametrize("name", ["conv_int8", "mlp_int8"])
def test_int8_every_conv_and_linear_is_delegated_integer(name: str, request: pytest.FixtureRequest) -> None:
    _, export = request.getfixturevalue(name)
    heavy = [op for op in export.ops if op.flops > 0]
    assert heavy and all(op.delegated and op.integer for op in heavy)
    assert all(op.activation_bits == 8 and op.weight_bits == 8 for op in heavy)
    total = sum(op.count for op in heavy)
    assert total == (4 if name == "conv_int8" else 3)


def test_int8_conv_reports_conversions_around_the_float_island(conv_int8) -> None:
    _, export = conv_int8
    dequantize = [op for op in export.ops if "dequantize_per_tensor" in op.op_type]
    quantize = [op for op in export.ops if "quantize_per_tensor" in op.op_type and op not in dequantize]
    # input -> int8, int8 -> float for the mean, float -> int8 after it, int8 -> float logits
    assert sum(op.count for op in quantize) == 2 and sum(op.count for op in dequantize) == 2
    # ReLU and ReLU6 (hardtanh) fuse into the conv's int8 output: integer, no traffic of their own
    clamps = _ops(export, "aten.relu") + _ops(export, "aten.hardtanh")
    assert sum(op.count for op in clamps) == 3 and all(op.integer and op.bytes_moved == 0 for op in clamps)


def test_int8_export_without_ptq_program_calibrates_from_the_spec(mlp_bundle, samples, tmp_path) -> None:
    planned = mlp_bundle.replace(quant=ptq.spec_from_config(ptq.Config(samples=4)))
    with pytest.raises(EdgekitError, match="calibration data"):
        export_pte(planned, tmp_path / "none")
    export = export_pte(planned, tmp_path / "calib", calib=samples(mlp_bundle, 4, seed=4))
    assert export.quantized and all(op.integer for op in _ops(export, "aten.linear"))


def test_int8_decoder_block_loads_runs_and_matches(decoder_bundle: ModelBundle, samples, tmp_path) -> None:
    """RoPE slices feeding a cat and RMSNorm's no-op casts once made XNNPACK reject the program
    ('Failed to create static slice node') or abort when freeing it (double free)."""
    quantized = ptq.apply(decoder_bundle, samples(decoder_bundle, 8, seed=5), ptq.Config(activations="all"))
    export = export_pte(quantized, tmp_path)
    program = PteProgram(export.path, ["input_ids"])
    sample = samples(decoder_bundle, 1, seed=6)[0]
    (out,) = program.run(sample)
    reference = _torch(quantized.simulated, sample)
    assert out.shape == (1, 8, 64)
    assert sqnr_db(reference, out) >= 35.0 and top1_agreement(out, reference) == 1.0
    assert all(op.integer for op in _ops(export, "aten.linear"))
    del program  # freeing the program must not abort the process


def test_transformer_pte_runs_dynamic_int8_linears(decoder_bundle: ModelBundle, samples, tmp_path) -> None:
    """Under ptq's gemm-inputs scope (auto for transformers) the .pte lowers XNNPACK's dynamic int8
    linear; it must be no further from float than the static simulated model (float-gap criterion)."""
    quantized = ptq.apply(decoder_bundle, samples(decoder_bundle, 8, seed=5), ptq.Config())
    assert quantized.meta["ptq"]["activations"] == "gemm-inputs"
    export = export_pte(quantized, tmp_path)
    assert export.delegation.undelegated.get("aten.linear.default", 0) == 0
    program = PteProgram(export.path, ["input_ids"])
    sample = samples(decoder_bundle, 1, seed=6)[0]
    (out,) = program.run(sample)
    reference, simulated = _torch(decoder_bundle.module, sample), _torch(quantized.simulated, sample)
    assert np.abs(out - reference).max() > 0  # quantized, not float
    assert sqnr_db(reference, out) >= sqnr_db(reference, simulated) - 3.0
    del program
