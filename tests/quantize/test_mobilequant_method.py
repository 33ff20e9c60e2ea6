"""MobileQuant on a tiny random LLaMA: transforms are exact equivalences, fake-quant is ORT's arithmetic,
SmoothQuant balances, optimisation lowers the loss, the export plan addresses real modules."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from mq_tiny import calib, tiny_llama
from onnx import TensorProto, helper, numpy_helper

from edgekit.errors import EdgekitError
from edgekit.models.llama import CausalLMWithCache
from edgekit.quantize import mobilequant
from edgekit.quantize.fakequant import ActQuant, WeightQuant
from edgekit.quantize.llama import HEAD_SITES, LAYER_SITES, SIXTEEN_BIT_OPS, Bits, QuantLlama
from edgekit.quantize.smoothquant import channel_maxima, smoothquant_init

TRANSFORMS = ("attn", "mlp", "vo", "qk", "ud")


@pytest.fixture(scope="module")
def float_model() -> CausalLMWithCache:
    return tiny_llama()


def ids(length: int = 12, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 101, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomise(model: QuantLlama, names: tuple[str, ...]) -> None:
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for transforms in model.transforms:
            for name in names:
                p = getattr(transforms, name)
                p.copy_(0.2 + 3.0 * torch.rand(p.shape, generator=generator))


@torch.no_grad()
@pytest.mark.parametrize("names", [(name,) for name in TRANSFORMS] + [TRANSFORMS])
def test_each_transform_keeps_the_float_function(float_model, names) -> None:
    x = ids()
    reference = float_model(x)
    model = QuantLlama(float_model, clip_init=40.0)  # sigmoid(40) == 1: no clipping
    randomise(model, names)
    assert (model(x) - reference).abs().max() < 1e-5
    # decode after a prefill in the transformed domain gives the float next-token logits
    past = model.prefill(x[:, :7])[1:]
    step = model.decode(x[:, 7:8], *past)[0]
    assert (step[:, 0] - reference[:, 7]).abs().max() < 1e-5
    model.fold()
    assert all(float((p - 1).abs().max()) == 0 for p in model.transform_parameters())
    assert (model(x) - reference).abs().max() < 1e-5


@torch.no_grad()
def test_smoothquant_init_balances_and_stays_equivalent(float_model) -> None:
    model = QuantLlama(float_model, clip_init=40.0)
    batches = mobilequant.model_batches(model, calib(), 2)
    before = channel_maxima(model, batches)
    smoothquant_init(model, batches, alpha=0.5)
    assert any(float((p - 1).abs().max()) > 0.01 for p in model.transform_parameters())
    after = channel_maxima(model, batches)
    spread = lambda m: float(m.max() / m.median())  # noqa: E731
    assert spread(after["0.attn_in"]) < spread(before["0.attn_in"])
    x = ids()
    assert (model(x) - float_model(x)).abs().max() < 1e-5


@pytest.mark.parametrize("bits,signed", [(8, False), (16, False)])
def test_activation_fake_quant_is_onnxruntime_qdq(bits, signed) -> None:
    quant = ActQuant(bits)
    quant.set_range(-1.3, 2.1)
    quant.enabled = True
    x = torch.linspace(-2.0, 3.0, 1001)
    override = quant.override()
    dtype = TensorProto.UINT8 if bits == 8 else TensorProto.UINT16
    np_dtype = np.uint8 if bits == 8 else np.uint16
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
        ],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1001])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1001])],
        [
            numpy_helper.from_array(np.array(override.scale, dtype=np.float32), "s"),
            numpy_helper.from_array(np.array(override.zero_point, dtype=np_dtype), "z"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"x": x.numpy()})[0]
    got = quant(x).detach().numpy()
    assert dtype in (TensorProto.UINT8, TensorProto.UINT16)
    np.testing.assert_allclose(got, expected, atol=1e-6 * float(override.scale) * 2**bits)


@pytest.mark.parametrize("bits", [8, 4])
def test_weight_fake_quant_matches_onnxruntime_weight_quantization(bits) -> None:
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.quant_utils import quantize_data

    torch.manual_seed(0)
    weight = torch.randn(16, 32)
    quant = WeightQuant(16, bits, per_channel=True, init=1.5)
    quant.enabled = True
    clipped = quant.clip(weight).detach()
    qtype = QuantType.QInt8 if bits == 8 else QuantType.QInt4
    for row in range(16):
        _, scale, q = quantize_data(clipped[row].numpy(), qtype.tensor_type, symmetric=True)
        expected = (q.astype(np.float32)) * scale
        np.testing.assert_allclose(quant(weight)[row].detach().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_a_step_with_a_non_finite_gradient_is_skipped_not_applied(float_model) -> None:
    """int8-only on SmolLM2 overflowed RMSNorm's backward at its second step and wrote NaN into
    every parameter; such a step is now skipped and counted, and training goes on."""
    from edgekit.quantize.optimise import float_targets, optimise

    model = QuantLlama(float_model, Bits())
    batches = [ids(seed=s) for s in (1, 2, 3)]
    mobilequant.minmax_ranges(model, batches)
    targets = float_targets(model, batches)
    poisoned = model.transforms[0].attn
    calls = []

    def overflow_once(grad: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return grad * float("inf") if len(calls) == 2 else grad

    poisoned.requires_grad_(True).register_hook(overflow_once)
    history = optimise(model, batches, targets, epochs=1, show_progress=False, max_grad_norm=1.0)
    assert history["steps"] == 3 and history["skipped"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_log_scales_move_every_scale_by_the_same_factor(float_model) -> None:
    """Plain parameters: Adam's first step moves a scale of 1e-4 and one of 30 by the same amount.
    Learned as logarithms, each moves by the same factor exp(±lr); plain parameters come back."""
    from torch.nn.utils import parametrize

    from edgekit.quantize.optimise import Schedule, float_targets, optimise

    model = QuantLlama(float_model, Bits())
    batches = [ids(seed=1)]
    mobilequant.minmax_ranges(model, batches)
    targets = float_targets(model, batches)
    scales = lambda: torch.stack([q.scale.detach().clone() for q in model.act_quants()])  # noqa: E731
    before = scales()
    assert float(before.max() / before.min()) > 100  # 8- and 16-bit sites: orders of magnitude apart
    transforms = torch.cat([p.detach().flatten() for p in model.transform_parameters()])
    rate = 0.05
    schedule = Schedule(transform=(rate, rate), clip=(0.0, 0.0), range=(rate, rate), log_scales=True)
    optimise(model, batches, targets, epochs=1, schedule=schedule, show_progress=False)
    assert not any(parametrize.is_parametrized(module) for module in model.modules())
    steps = (scales() / before).log().abs()
    sixteen = torch.tensor([q.bits == 16 for q in model.act_quants()])
    # Adam's first step is lr · g / (|g| + eps): at most the rate, and the whole rate at both bit-widths
    assert float(steps.max()) <= rate * 1.001
    assert float(steps[sixteen].max()) > 0.9 * rate and float(steps[~sixteen].max()) > 0.9 * rate
    after = torch.cat([p.flatten() for p in model.transform_parameters()])
    assert float((after / transforms).log().abs().max()) == pytest.approx(rate, rel=1e-3)
    assert all(not p.requires_grad for p in model.parameters())


def test_optimisation_trains_every_parameter_group(float_model) -> None:
    config = mobilequant.Config(samples=6, seq_len=24, epochs=2, batch_size=2)
    model, facts = mobilequant.quantize_model(float_model, calib(), config, show_progress=False)
    assert facts["steps"] == 6 and np.isfinite(facts["loss_last"])
    reference, _ = mobilequant.quantize_model(
        float_model, calib(), mobilequant.Config(samples=6, seq_len=24, epochs=0), show_progress=False
    )
    moved = lambda a, b: any(float((x - y).abs().max()) > 0 for x, y in zip(a, b, strict=True))  # noqa: E731
    assert moved(model.transform_parameters(), reference.transform_parameters())
    assert moved(model.clip_parameters(), reference.clip_parameters())
    assert moved([q.scale for q in model.act_quants()], [q.scale for q in reference.act_quants()])
    assert all(not p.requires_grad for p in model.parameters())


def test_overrides_name_modules_and_carry_the_papers_bits(float_model) -> None:
    for int8_only in (False, True):
        config = mobilequant.Config(samples=4, seq_len=16, epochs=0, learn=False, int8_only=int8_only)
        model, _ = mobilequant.quantize_model(float_model, calib(4, 16), config, show_progress=False)
        table = model.overrides()
        modules = dict(model.named_modules())
        assert set(table) <= set(modules)
        assert len(table) == model.num_layers * len(LAYER_SITES) + len(HEAD_SITES)
        for site, (kind, path) in LAYER_SITES.items():
            override = table[path.format(i=1)]
            assert override.bits == (8 if kind == "matmul" or int8_only else 16), site
            assert 0 <= override.zero_point < 2**override.bits and override.scale > 0
        spec = mobilequant.quant_spec(model, config, 4)
        assert spec.sixteen_bit_ops == (frozenset() if int8_only else SIXTEEN_BIT_OPS)


def test_bits_follow_the_paper() -> None:
    w8 = mobilequant.bits_of(mobilequant.Config())
    assert (w8.weight, w8.matmul, w8.other, w8.per_channel, w8.per_channel_down) == (8, 8, 16, False, True)
    w4 = mobilequant.bits_of(mobilequant.Config(weight_bits=4))
    assert (w4.weight, w4.per_channel) == (4, True)
    assert mobilequant.bits_of(mobilequant.Config(int8_only=True)).other == 8
    with pytest.raises(EdgekitError):
        mobilequant.bits_of(mobilequant.Config(weight_bits=2))
    model = QuantLlama(tiny_llama(1), Bits(weight=8))
    quants = model.wquant[0]
    assert not quants["q_proj"].per_channel and quants["down_proj"].per_channel


def test_apply_rejects_models_of_no_supported_family() -> None:
    from edgekit.models.bundle import ModelBundle

    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))  # neither a conv net nor an LLM
    bundle = ModelBundle("x", module, {"x": torch.zeros(1, 2)}, "generic")
    with pytest.raises(EdgekitError, match="LLaMA"):
        mobilequant.apply(bundle, calib(1), mobilequant.Config())
