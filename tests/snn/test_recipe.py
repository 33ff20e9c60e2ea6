"""The snn-iir recipe: settings, the transform on a tiny real-data bundle, and clear refusals."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from snn_tiny import TinyVGG

from edgekit import recipes
from edgekit.errors import EdgekitError
from edgekit.exporters.report import snn_section
from edgekit.models import fmnist
from edgekit.models.bundle import ModelBundle
from edgekit.snn import recipe as snn_recipe
from edgekit.snn.convert import convert


def _bundle(module: torch.nn.Module) -> ModelBundle:
    return ModelBundle(
        spec="test:tiny-vgg",
        module=module,
        example_inputs={"x": torch.zeros(1, 1, 28, 28)},
        task="classifier",
        dynamic_axes={"x": {0: "batch"}},
        preprocess=fmnist.preprocess,
        dataset="fashion-mnist",
        source_hash="tiny-vgg",
    )


def test_recipe_settings_and_overrides() -> None:
    recipe = recipes.load("snn-iir", {"ladder": "5,4,3,2,1", "epochs": "1"})
    assert recipe.transform == "snn-iir" and recipe.settings.ladder == [5, 4, 3, 2, 1]
    assert recipe.settings.epochs == [1.0] and recipe.settings.train == "fashion-mnist"
    assert recipes.load("snn-iir").settings.ladder == [5, 3, 1]


def test_zoo_vgg_architecture_converts() -> None:
    kinds = [type(op).__name__ for op in convert(fmnist.build_vgg().eval(), torch.randn(4, 1, 28, 28)).ops]
    assert kinds.count("LIF") == 6 and kinds[-1] == "Linear" and "AvgPool2d" in kinds


def test_apply_returns_spiking_bundle(tiny_ann, tmp_path) -> None:
    config = snn_recipe.Config(
        ladder=[2, 1], epochs=[0.25], train_samples=256, eval_samples=64, energy_samples=16, cache=False
    )
    bundle = _bundle(tiny_ann)
    out = snn_recipe.apply(bundle, [], config)
    x = fmnist.preprocess(fmnist.fashion_mnist.arrays("eval")[0][5])
    with torch.no_grad():
        exported, simulated = out.module(**x), out.simulated(**x)
    assert exported.shape == (1, 10)
    torch.testing.assert_close(exported, simulated, rtol=0, atol=1e-6)
    assert out.meta["timesteps"] == 1 and out.meta["float_module"] is tiny_ann
    report = out.meta["snn"]
    assert set(report["stage_accuracy"]) == {"2", "1"} and set(report["conversion_accuracy"]) == {"2", "1"}
    assert report["ops"]["energy_ratio"] > 1 and len(report["ops"]["spike_rates"]) == 3
    assert out.module is not bundle.module
    # the bundle report's spiking section: one row per counted layer, the energy ratio, the plot
    lines = snn_section(tmp_path, report)
    table = [row for line in lines for row in line.splitlines() if row.startswith("| ")]
    assert len(table) == 1 + len(report["ops"]["layers"])
    assert any("x lower" in line for line in lines) and (tmp_path / "snn.png").stat().st_size > 0


def test_cached_training_is_reused_and_remeasured_on_another_eval_set(tiny_ann, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path))
    config = snn_recipe.Config(ladder=[2, 1], epochs=[0.25], train_samples=256, eval_samples=32, energy_samples=16)
    first = snn_recipe.train_snn(_bundle(tiny_ann), config, show_progress=False)
    larger = snn_recipe.train_snn(_bundle(tiny_ann), dataclasses.replace(config, eval_samples=96), show_progress=False)
    assert len(list(tmp_path.glob("snn-iir-*"))) == 1  # trained once
    assert first["record"]["eval_samples"] == 32 and larger["record"]["eval_samples"] == 96
    eval_x, eval_y = larger["eval"]
    for stage in larger["stages"]:
        assert stage.accuracy == snn_recipe.accuracy(larger["nets"][stage.timesteps], eval_x, eval_y)
    assert larger["record"]["ann_accuracy"] == snn_recipe.accuracy(tiny_ann, eval_x, eval_y)


def test_refusals() -> None:
    with pytest.raises(EdgekitError, match="converts classifiers"):
        snn_recipe.apply(_bundle(TinyVGG()).replace(task="generic"), [], snn_recipe.Config())
    with pytest.raises(EdgekitError, match="decreasing"):
        snn_recipe.apply(_bundle(TinyVGG()), [], snn_recipe.Config(ladder=[1, 5]))
    with pytest.raises(EdgekitError, match="one per ladder stage"):
        snn_recipe.apply(_bundle(TinyVGG()), [], snn_recipe.Config(ladder=[5, 3, 1], epochs=[1, 1]))


def test_apply_converts_a_resnet(tiny_resnet) -> None:
    config = snn_recipe.Config(
        ladder=[2, 1], epochs=[0.25], train_samples=256, eval_samples=64, energy_samples=16, cache=False
    )
    out = snn_recipe.apply(_bundle(tiny_resnet).replace(source_hash="tiny-resnet"), [], config)
    x = fmnist.preprocess(fmnist.fashion_mnist.arrays("eval")[0][5])
    with torch.no_grad():
        torch.testing.assert_close(out.module(**x), out.simulated(**x), rtol=0, atol=1e-5)
    ops = out.meta["snn"]["ops"]
    assert len(ops["spike_rates"]) == 5 and ops["energy_ratio"] > 1
    assert "Join" in [type(op).__name__ for op in out.simulated.net.ops]


def test_mobilenetv2_is_refused_by_name() -> None:
    from edgekit.models.mobilenetv2 import build

    with pytest.raises(EdgekitError, match="cannot convert MobileNetV2 to a spiking network: ReLU6"):
        convert(build().eval(), torch.randn(2, 3, 64, 64))
