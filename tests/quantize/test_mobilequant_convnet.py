"""MobileQuant on plain conv nets: BatchNorm folding, learned clipping and ranges, the integer graph."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mq_tiny import tiny_llama
from test_mobilequant_encoder import _graph_tensors
from test_mobilequant_export import qdq_params
from torch import nn

from edgekit import recipes
from edgekit.calibrate import calibration_inputs
from edgekit.errors import EdgekitError
from edgekit.evaluate import sqnr_db
from edgekit.exporters import onnx as onnx_exporter
from edgekit.exporters.verify import onnx_session
from edgekit.models.bundle import ModelBundle
from edgekit.quantize import mobilequant
from edgekit.quantize.convnet import QuantConvNet, is_convnet


class Residual(nn.Module):
    """A block whose add is a function, not a module (as MobileNetV2's): MinMax calibrates it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU6())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2), Residual(8)
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(8, 5))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def tiny_bundle() -> ModelBundle:
    torch.manual_seed(0)
    net = TinyCNN()
    with torch.no_grad():
        for norm in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
            norm.running_mean.uniform_(-0.2, 0.2)
            norm.running_var.uniform_(0.5, 1.5)
            norm.weight.uniform_(0.5, 1.5)
    return ModelBundle(
        spec="tiny:cnn", module=net.eval(), example_inputs={"images": torch.randn(1, 3, 12, 12)}, task="classifier"
    )


def feeds(count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"images": rng.standard_normal((1, 3, 12, 12)).astype(np.float32)} for _ in range(count)]


def test_folded_batchnorm_keeps_the_float_function() -> None:
    bundle = tiny_bundle()
    model = QuantConvNet(bundle.module)
    images = torch.as_tensor(np.concatenate([f["images"] for f in feeds(4)]))
    with torch.no_grad():
        assert float((model(images) - bundle.module(images)).abs().max()) < 1e-5
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    # sites: the input, the ReLU, the ReLU6, the residual add (a function in forward, made a module),
    # the global pool and the linear layer; a conv that an activation follows is fused with it, and a
    # max-pool keeps its input's grid
    assert len(model.act_quants()) == 6 and len(model.weight_quants()) == 3
    assert sorted(model.overrides()) == [
        "images",
        "net.add_0",
        "net.features.2",
        "net.features.4.body.2",
        "net.head.0",
        "net.head.3",
    ]


def test_the_recipe_exports_its_learned_ranges_as_an_integer_graph(tmp_path) -> None:
    from edgekit.devices.check import check
    from edgekit.exporters.onnx_ops import onnx_op_stats

    bundle, data = tiny_bundle(), feeds(16)
    quantized = mobilequant.apply(bundle, data, mobilequant.Config(weight_bits=4, samples=16, epochs=4))
    assert quantized.meta["mobilequant"]["steps"] == 16

    path = onnx_exporter.export_onnx(quantized, tmp_path / "qdq", data).graphs["model"].path
    floats = onnx_exporter.export_onnx(quantized.replace(quant=None), tmp_path / "fp32")
    params, tensors = qdq_params(path), _graph_tensors(floats.graphs["model"].path)
    assert "images" in quantized.quant.overrides
    for site, override in quantized.quant.overrides.items():
        scale, zero, bits = params[tensors.get(site, site)]
        assert (bits, zero) == (override.bits, override.zero_point), site
        assert scale == pytest.approx(override.scale, rel=1e-6), site

    session = onnx_session(path)
    for feed in feeds(3, seed=50):
        runtime = session.run(None, feed)[0]
        with torch.no_grad():
            simulated = quantized.simulated(torch.as_tensor(feed["images"])).numpy()
            folded_float = quantized.module(torch.as_tensor(feed["images"])).numpy()
        assert sqnr_db(simulated, runtime) > 30.0
        assert sqnr_db(simulated, runtime) > sqnr_db(folded_float, runtime) + 5.0  # it runs the quantized model
    size = sum(p.stat().st_size for p in (tmp_path / "qdq").iterdir())
    verdict = check(onnx_op_stats(path), size, None, "snapdragon-8gen3-npu", "onnx-qdq")
    assert verdict.passed, verdict.reasons
    assert verdict.integer_coverage_count == 1.0


def test_the_int8_program_runs_the_simulation(tmp_path) -> None:
    from edgekit.exporters.executorch import export_pte
    from edgekit.runtime.pte import PteProgram

    bundle, data = tiny_bundle(), feeds(8)
    quantized = mobilequant.apply(bundle, data, mobilequant.Config(samples=8, epochs=2))
    result = export_pte(quantized, tmp_path)
    feed = {name: torch.as_tensor(value) for name, value in feeds(1, seed=70)[0].items()}
    output = PteProgram(result.path, list(feed)).run({k: v.numpy() for k, v in feed.items()})[0]
    with torch.no_grad():
        simulated = quantized.simulated(**feed).numpy()
        folded_float = quantized.module(**feed).numpy()
    # XNNPACK's fused conv+activation and its max-pool carry exactly the simulated grids
    assert sqnr_db(simulated, output) > 40.0
    assert sqnr_db(simulated, output) > sqnr_db(folded_float, output) + 5.0


def test_learned_clipping_beats_minmax_at_four_bits() -> None:
    bundle, data = tiny_bundle(), feeds(32)
    with torch.no_grad():  # one outlier weight per output channel, as trained convolutions have:
        for layer in (m for m in bundle.module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))):
            flat = layer.weight.view(layer.weight.shape[0], -1)
            flat[:, 0] = 2.0 * flat.abs().amax(dim=1)  # min-max spends the 4-bit grid on it
    minmax, _ = mobilequant.quantize_model(
        bundle.module, data, mobilequant.Config(weight_bits=4, learn=False, epochs=0, clip_init=30.0), False
    )
    learned, facts = mobilequant.quantize_model(
        bundle.module, data, mobilequant.Config(weight_bits=4, samples=32, epochs=16), False
    )
    held_out = torch.as_tensor(np.concatenate([f["images"] for f in feeds(64, seed=9)]))
    with torch.no_grad():
        reference = bundle.module(held_out)
        errors = [float(((m.set_quant(True, True)(held_out) - reference) ** 2).mean()) for m in (minmax, learned)]
    assert errors[1] < 0.9 * errors[0], errors  # measured: 23% lower
    start = mobilequant.FAMILY_CLIP_INITS["convnet"]
    moved = max(float((q.logit - start).abs().max()) for q in learned.weight_quants())
    assert moved > 0.5, "the clipping logits did not learn"


def test_a_hand_written_forward_is_read_by_its_dataflow(small_conv) -> None:
    """The BatchNorm applied in ``forward`` after the conv folds; ``torch.relu`` becomes a site that
    the conv fuses into (the conv's own output is no site)."""
    simulated = QuantConvNet(small_conv.module)
    pixels = small_conv.example_inputs["pixels"]
    with torch.no_grad():  # every quantizer off: the folded float network
        torch.testing.assert_close(simulated(pixels), small_conv.module(pixels), atol=1e-5, rtol=1e-5)
    assert isinstance(simulated.net.get_submodule("bn"), nn.Identity)
    assert "conv" not in simulated.paths and "relu_0" in simulated.paths


class Branching(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if x.sum() > 0 else self.conv(-x)


def test_what_is_not_a_plain_conv_net_is_refused() -> None:
    with pytest.raises(EdgekitError, match="'0' does not follow a conv/linear"):
        QuantConvNet(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3)))
    with pytest.raises(EdgekitError, match="torch.fx, which cannot trace this Branching"):
        QuantConvNet(Branching())
    assert not is_convnet(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))


@pytest.mark.slow
def test_fmnist_cnn_through_the_recipe(tmp_path) -> None:
    from edgekit.models import load

    bundle = load("zoo:fmnist-cnn")
    recipe = recipes.load("mobilequant-w8a8", {"samples": "16", "epochs": "2"})
    calib = calibration_inputs(bundle, None, recipe.settings.samples)
    quantized = recipe.transform_module().apply(bundle, calib, recipe.settings)
    result = onnx_exporter.export_onnx(quantized, tmp_path, calib)
    test = calibration_inputs(bundle, None, 32, split="eval")
    images = np.concatenate([f["x"] for f in test])
    runtime = onnx_session(result.graphs["model"].path).run(None, {"x": images})[0]
    with torch.no_grad():
        reference = bundle.module(torch.as_tensor(images)).numpy()
    assert np.mean(runtime.argmax(1) == reference.argmax(1)) > 0.9
    assert sqnr_db(reference, runtime) > 20.0


@pytest.mark.slow
def test_mobilenetv2_residual_adds_are_sites_and_its_file_tracks_the_simulation(tmp_path) -> None:
    from edgekit.models import load

    bundle = load("zoo:mobilenetv2")
    calib = calibration_inputs(bundle, None, 4)
    quantized = mobilequant.apply(bundle, calib, mobilequant.Config(samples=4, epochs=1))
    adds = [path for path in quantized.quant.overrides if path.startswith("net.add_")]
    assert len(adds) == 10  # MobileNetV2's ten residual connections
    result = onnx_exporter.export_onnx(quantized, tmp_path, calib)
    session = onnx_session(result.graphs["model"].path)
    for feed in calibration_inputs(bundle, None, 2, split="eval"):
        runtime = session.run(None, feed)[0]
        with torch.no_grad():
            simulated = quantized.simulated(**{k: torch.as_tensor(v) for k, v in feed.items()}).numpy()
        assert sqnr_db(simulated, runtime) > 18.0  # 52 convolutions of 8-bit rounding; 14 dB with the adds float


def test_a_budget_the_recipe_leaves_unset_is_the_model_familys() -> None:
    cnn = tiny_bundle().module
    for name, module in (("convnet", cnn), ("llama", tiny_llama())):
        settings = recipes.load("mobilequant-w4a8").for_model(module).settings
        assert (settings.samples, settings.epochs) == mobilequant.FAMILY_BUDGETS[name]
    chosen = recipes.load("mobilequant-w4a8", {"samples": "8"}).for_model(cnn).settings
    assert (chosen.samples, chosen.epochs) == (8, mobilequant.FAMILY_BUDGETS["convnet"][1])
    assert mobilequant.FAMILY_BUDGETS["convnet"] != mobilequant.FAMILY_BUDGETS["llama"]
    assert recipes.load("ptq-int8").for_model(cnn).settings == recipes.load("ptq-int8").settings
