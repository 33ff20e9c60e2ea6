"""The pipeline reads what the sorted transform declares (formats, its own exporter), no special cases."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgekit.errors import EdgekitError
from edgekit.pipeline import FORMATS, plan_export
from edgekit.sorted import recipe as sorted_recipe

MODEL = "tests.sorted.smol_slice:bundle"
DEVICE = "x86-cpu-onnxruntime"


def test_sorted_plans_export_only_the_formats_it_declares(tmp_path: Path) -> None:
    assert plan_export(MODEL, "sorted", DEVICE, tmp_path / "a").formats == list(sorted_recipe.FORMATS) == ["onnx"]
    with pytest.raises(EdgekitError, match="the sorted recipe exports onnx only"):
        plan_export(MODEL, "sorted", DEVICE, tmp_path / "b", fmt="pte")
    assert plan_export(MODEL, "fp32", DEVICE, tmp_path / "c").formats == list(FORMATS)  # the default: all


def test_the_sorted_exporter_refuses_other_formats(tmp_path: Path) -> None:
    with pytest.raises(EdgekitError, match="exports onnx only, not pte"):
        sorted_recipe.export_format("pte", None, tmp_path, {}, None)
