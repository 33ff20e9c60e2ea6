"""The ptq transform: pt2e + XNNPACKQuantizer static int8, and the graph passes that keep it lowerable."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchao.quantization.pt2e  # noqa: F401  (registers the quantized_decomposed ops)
from torch import nn

from edgekit import recipes
from edgekit.errors import EdgekitError
from edgekit.evaluate import sqnr_db
from edgekit.models.bundle import ModelBundle
from edgekit.quantize import ptq
from edgekit.quantize.spec import QuantSpec

DQ_CHANNEL = torch.ops.quantized_decomposed.dequantize_per_channel.default
Q_TENSOR = torch.ops.quantized_decomposed.quantize_per_tensor.default


def _outputs(module: torch.nn.Module, data: list[dict[str, np.ndarray]]) -> np.ndarray:
    with torch.no_grad():
        outs = [module(**{k: torch.from_numpy(v) for k, v in d.items()}).numpy() for d in data]
    return np.concatenate(outs)


@pytest.fixture(scope="module")
def quantized(small_conv: ModelBundle, calibration) -> ModelBundle:
    return ptq.apply(small_conv, calibration(32), ptq.Config(samples=16))


def test_simulated_is_close_to_float_but_really_quantized(small_conv, quantized, calibration) -> None:
    data = calibration(16)
    reference, simulated = _outputs(small_conv.module, data), _outputs(quantized.simulated, data)
    assert sqnr_db(reference, simulated) > 25.0
    assert np.abs(reference - simulated).max() > 1e-4  # int8 rounding is visible
    assert quantized.meta["ptq"]["samples_used"] == 16
    assert quantized.meta["pt2e_program"] is quantized.simulated
    assert small_conv.quant is None and small_conv.simulated is None  # the input bundle is untouched


def test_plan_and_graph_are_int8(quantized: ModelBundle) -> None:
    assert quantized.quant == QuantSpec(weight_bits=8, weight_per_channel=True, activation_bits=8, samples=16)
    nodes = list(quantized.simulated.graph.nodes)
    assert sum(n.target == DQ_CHANNEL for n in nodes) == 2  # conv and linear weights, per channel
    assert all(n.args[-1] == torch.int8 for n in nodes if n.target == Q_TENSOR)
    assert quantized.meta["ptq"]["quantized_ops"]["aten.conv2d"] == 1


def test_per_tensor_weights_and_histogram_calibration(small_conv, quantized, calibration) -> None:
    per_tensor = ptq.apply(small_conv, calibration(8), ptq.Config(per_channel=False, calibration="histogram"))
    assert not any(n.target == DQ_CHANNEL for n in per_tensor.simulated.graph.nodes)
    assert per_tensor.quant.calibration == "histogram" and not per_tensor.quant.weight_per_channel
    data = calibration(4, seed=1)
    assert not np.array_equal(_outputs(per_tensor.simulated, data), _outputs(quantized.simulated, data))


def test_config_and_data_errors(small_conv: ModelBundle, calibration) -> None:
    data = calibration(2)
    with pytest.raises(EdgekitError, match="8-bit"):
        ptq.apply(small_conv, data, ptq.Config(weight_bits=4))
    with pytest.raises(EdgekitError, match="calibration must be"):
        ptq.apply(small_conv, data, ptq.Config(calibration="entropy"))
    with pytest.raises(EdgekitError, match="needs calibration data"):
        ptq.apply(small_conv, [], ptq.Config())
    with pytest.raises(EdgekitError, match="missing pixels"):
        ptq.apply(small_conv, [{"image": data[0]["pixels"]}], ptq.Config())
    with pytest.raises(EdgekitError, match=r"shape \[1, 3, 8, 8\]"):
        ptq.apply(small_conv, [{"pixels": np.zeros((1, 3, 8, 8), np.float32)}], ptq.Config())
    with pytest.raises(EdgekitError, match="NaN"):
        ptq.apply(small_conv, [{"pixels": np.full((1, 3, 12, 12), np.nan, np.float32)}], ptq.Config())


def test_recipe_loads_with_overrides() -> None:
    recipe = recipes.load("ptq-int8")
    assert recipe.transform == "ptq" and isinstance(recipe.settings, ptq.Config)
    assert recipe.settings.samples == 64 and recipe.settings.per_channel
    assert 0 < recipe.verify.min_sqnr_db < 40 and 0.9 <= recipe.verify.min_top1_agreement <= 1.0
    tuned = recipes.load("ptq-int8", {"samples": "8", "calibration": "histogram", "verify.min_sqnr_db": "20"})
    assert (tuned.settings.samples, tuned.settings.calibration) == (8, "histogram")
    assert tuned.verify.min_sqnr_db == 20.0


class RotateHalf(nn.Module):
    """RoPE-like rotate-half: slices whose int8 output must take the cat's (wider) scale, then a
    no-op cast as transformers' RMSNorm does."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return self.b(torch.cat((y[..., 8:] * -4.0, y[..., :8]), dim=-1).to(torch.float32))


def test_graph_rewrites_are_exact() -> None:
    """The XNNPACK rewrites change the graph the delegate sees, never the numbers."""
    torch.manual_seed(0)
    net = RotateHalf().eval()
    example = {"x": torch.randn(2, 16)}
    spec = ptq.spec_from_config(ptq.Config())
    data = [{"x": np.random.default_rng(i).standard_normal((2, 16)).astype(np.float32)} for i in range(4)]
    rewritten = ptq.quantize_program(net, example, data, spec)
    plain = ptq.quantize_program(net, example, data, spec, xnnpack_rewrites=False)
    assert "aten.to.dtype" in {str(n.target) for n in plain.graph.nodes}
    assert "aten.to.dtype" not in {str(n.target) for n in rewritten.graph.nodes}
    assert ptq.requantize_before_copies(rewritten) == 0  # already done, and idempotent
    # both slices: one feeds the cat (the cat's wider scale), one the mul (its own input observer)
    assert ptq.requantize_before_copies(plain) == 2
    for d in data:
        x = torch.from_numpy(d["x"])
        assert torch.equal(rewritten(x=x), plain(x=x))


class ConvReLU6(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


def test_relu6_is_quantized_after_the_clamp(calibration) -> None:
    """conv -> ReLU6 is one int8 op: its output range is [0, 6] at most, not the conv's raw range."""
    torch.manual_seed(0)
    example = {"x": torch.randn(1, 3, 12, 12)}
    data = [{"x": 4 * d["pixels"]} for d in calibration(4)]  # conv outputs well beyond [0, 6]
    program = ptq.quantize_program(ConvReLU6().eval(), example, data, ptq.spec_from_config(ptq.Config()))
    conv = next(n for n in program.graph.nodes if n.target == torch.ops.aten.conv2d.default)
    (clamp,) = conv.users
    assert "hardtanh" in str(clamp.target)  # no quantize between the conv and its clamp
    (quantize,) = clamp.users
    scale, zero_point = quantize.args[1], quantize.args[2]
    assert quantize.target == Q_TENSOR and zero_point == -128 and scale <= 6.0 / 255 + 1e-9


class _TinyEncoder(nn.Module):
    """Token features -> linear -> residual add -> mean over the sequence: a text encoder's shape."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head((tokens + self.proj(tokens)).mean(dim=1))


def test_calibration_longer_than_the_example_traces_a_dynamic_sequence() -> None:
    torch.manual_seed(0)
    bundle = ModelBundle(
        spec="tiny:encoder",
        module=_TinyEncoder().eval(),
        example_inputs={"tokens": torch.randn(1, 5, 16)},
        task="text-encoder",
        dynamic_axes={"tokens": {1: "sequence"}},
    )
    rng = np.random.default_rng(0)
    data = [{"tokens": rng.standard_normal((1, length, 16)).astype(np.float32)} for length in (12, 9, 12, 7)]
    assert ptq.dynamic_calibration_axes(bundle.example_inputs, data, bundle.dynamic_axes) == {"tokens": {1}}
    quantized = ptq.apply(bundle, data, ptq.Config(samples=4))
    probe = [{"tokens": rng.standard_normal((1, length, 16)).astype(np.float32)} for length in (6, 30)]
    for sample in probe:  # lengths never calibrated run, quantized, close to float (4 outputs, 4 samples)
        reference, simulated = _outputs(bundle.module, [sample]), _outputs(quantized.simulated, [sample])
        assert 0 < np.abs(reference - simulated).max() < 0.5 * np.abs(reference).max()
    with pytest.raises(EdgekitError, match=r"shape \[1, 9, 8\]"):  # the feature axis stays static
        ptq.apply(bundle, [{"tokens": np.zeros((1, 9, 8), np.float32)}], ptq.Config())
    anchors = quantized.meta["range_anchors"]
    assert {anchor.shape for anchor in anchors if anchor.is_weight} == {(16, 16), (4, 16)}
    assert any(not anchor.is_weight and anchor.shape == (1, 12, 16) for anchor in anchors)  # first sample's length


class _TinyBert(nn.Module):
    """BERT-like: embeddings, post-LN blocks with an additive padding mask, mean pooling.

    Each block's FFN output writes an outlier channel (~40x the others) that the next norm
    scales back down, as BERT's residual stream carries a few: the reason ``auto`` keeps
    transformers' residual stream float.
    """

    def __init__(self, dim: int = 32, vocab: int = 64, blocks: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.dim = dim
        self.blocks = nn.ModuleList()
        for _ in range(blocks):
            block = nn.ModuleDict(
                {
                    "qkv": nn.Linear(dim, 3 * dim),
                    "out": nn.Linear(dim, dim),
                    "norm1": nn.LayerNorm(dim),
                    "up": nn.Linear(dim, 2 * dim),
                    "down": nn.Linear(2 * dim, dim),
                    "norm2": nn.LayerNorm(dim),
                }
            )
            with torch.no_grad():  # the outlier, and the norm that scales it back down (BERT's small gamma)
                block["down"].bias[0] = 40.0
                block["norm2"].weight[0] = 0.02
            self.blocks.append(block)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        keep = attention_mask.to(torch.float32)
        mask = ((1.0 - keep) * -1.0e4)[:, None, :]
        x = self.embed(input_ids)
        for block in self.blocks:
            q, k, v = block["qkv"](x).split(self.dim, dim=-1)
            scores = torch.matmul(q, k.transpose(1, 2)) * self.dim**-0.5 + mask
            x = block["norm1"](x + block["out"](torch.matmul(torch.softmax(scores, dim=-1), v)))
            x = block["norm2"](x + block["down"](nn.functional.gelu(block["up"](x))))
        return (x * keep[..., None]).sum(dim=1) / keep.sum(dim=1, keepdim=True)


def _bert_bundle() -> ModelBundle:
    torch.manual_seed(0)
    return ModelBundle(
        spec="tiny:bert",
        module=_TinyBert().eval(),
        example_inputs={
            "input_ids": torch.randint(0, 64, (1, 8)),
            "attention_mask": torch.ones(1, 8, dtype=torch.long),
        },
        task="text-encoder",
        dynamic_axes={"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}},
    )


def _bert_data(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Token windows of 12 with the last few padded out (the mask path is exercised)."""
    rng = np.random.default_rng(seed)
    data = []
    for index in range(count):
        mask = np.ones((1, 12), np.int64)
        mask[0, 12 - index % 4 :] = 0
        data.append({"input_ids": rng.integers(0, 64, (1, 12)), "attention_mask": mask})
    return data


def test_transformers_keep_their_residual_stream_float() -> None:
    bundle = _bert_bundle()
    calib, probe = _bert_data(8, 0), _bert_data(4, 1)
    auto = ptq.apply(bundle, calib, ptq.Config(samples=8))
    full = ptq.apply(bundle, calib, ptq.Config(samples=8, activations="all"))
    assert auto.meta["ptq"]["activations"] == "gemm-inputs" and full.meta["ptq"]["activations"] == "all"
    assert auto.meta["onnx_op_types"] == ["MatMul", "Gemm", "Gather"] and "onnx_op_types" not in full.meta
    # every int8 activation feeds a linear layer or a matmul: norms, adds, softmax, mask stay float
    dequantize = torch.ops.quantized_decomposed.dequantize_per_tensor.default
    gemms = {"aten.linear.default", "aten.matmul.default", "aten.bmm.default"}
    copies = {"aten.view.default", "aten.transpose.int", "aten.permute.default", "aten.reshape.default"}
    for node in auto.simulated.graph.nodes:
        if node.target == dequantize:
            users = {str(user.target) for user in node.users}
            assert users <= gemms | copies, users
    assert set(auto.meta["ptq"]["quantized_ops"]) == {"aten.linear", "aten.matmul"}
    reference = _outputs(bundle.module, probe)
    kept, quantized_all = _outputs(auto.simulated, probe), _outputs(full.simulated, probe)
    assert np.abs(reference - kept).max() > 1e-4  # still really quantized
    assert sqnr_db(reference, kept) > sqnr_db(reference, quantized_all) + 10.0
    # the .pte lowers XNNPACK's dynamic int8 linear (outputs float), not the static program
    program = auto.meta["pt2e_program"]
    assert program is not auto.simulated
    assert any("choose_qparams" in str(node.target) for node in program.graph.nodes)


def test_transformer_onnx_file_computes_the_simulated_model(tmp_path) -> None:
    """Under gemm-inputs the QDQ file quantizes only MatMul inputs, per edge as pt2e does: the
    residual add reads the LayerNorm output in float, not through the next linear's Q/DQ pair
    (through it: 47.6 dB from the simulated model; per edge: equal to float precision)."""
    from edgekit.exporters.onnx import export_onnx
    from edgekit.exporters.verify import onnx_session

    bundle = _bert_bundle()
    calib, probe = _bert_data(8, 0), _bert_data(4, 1)
    quantized = ptq.apply(bundle, calib, ptq.Config(samples=8))
    export = export_onnx(quantized, tmp_path, calib)
    assert export.quantization["quantized_op_types"] == ["Gather", "MatMul"]
    assert export.quantization["ranges_from_pt2e"] == 16  # every pt2e quantization point located
    session = onnx_session(export.main.path)
    runtime = np.concatenate([session.run(None, sample)[0] for sample in probe])
    assert sqnr_db(_outputs(quantized.simulated, probe), runtime) > 80.0


def test_the_pte_is_held_to_a_per_row_reference_of_xnnpack_dynamic_linears(tmp_path) -> None:
    """XNNPACK's dynamic int8 linear takes one range per activation row; torch's reference ops one
    per tensor. The per-row twin is what the .pte computes, so it is the .pte's simulated model."""
    from edgekit.exporters.executorch import export_pte
    from edgekit.runtime.pte import PteProgram

    bundle = _bert_bundle()
    quantized = ptq.apply(bundle, _bert_data(8, 0), ptq.Config(samples=8))
    reference = quantized.simulated_for("pte")
    assert reference is not quantized.meta["pt2e_program"]
    assert any(node.target is ptq.fake_quantize_rows for node in reference.graph.nodes)
    result = export_pte(quantized, tmp_path)
    feeds = {name: tensor.numpy() for name, tensor in bundle.example_inputs.items()}
    runtime = PteProgram(result.path, list(feeds)).run(feeds)[0]
    per_row = _outputs(reference, [feeds])
    per_tensor = _outputs(quantized.meta["pt2e_program"], [feeds])
    assert sqnr_db(per_row, runtime) > 35.0
    assert sqnr_db(per_row, runtime) > sqnr_db(per_tensor, runtime) + 5.0
