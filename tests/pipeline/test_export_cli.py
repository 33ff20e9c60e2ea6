"""The export command end to end on a tiny factory model, and every user error it must refuse."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

FACTORY = """
import torch

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))

def make():
    torch.manual_seed(0)
    return Net().eval(), (torch.randn(1, 1, 8, 8),)

def boom():
    raise RuntimeError("checkpoint missing")
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    (root / "tinyfactory.py").write_text(FACTORY)
    rng = np.random.default_rng(0)
    calib = root / "calib"
    calib.mkdir()
    np.savez(calib / "batch.npz", x=rng.standard_normal((16, 1, 1, 8, 8)).astype(np.float32))
    np.savez(root / "x.npz", x=rng.standard_normal((1, 1, 8, 8)).astype(np.float32))
    np.savez(root / "wrong.npz", x=rng.standard_normal((1, 1, 9, 9)).astype(np.float32))
    nan = rng.standard_normal((4, 1, 1, 8, 8)).astype(np.float32)
    nan[2, 0, 0, 3, 3] = np.nan
    (root / "nan").mkdir()
    np.savez(root / "nan" / "b.npz", x=nan)
    return root


@pytest.fixture(scope="module")
def cli(edgekit_cli):
    def call(workspace: Path, *args: str):
        return edgekit_cli(*args, cwd=workspace)

    return call


@pytest.fixture(scope="module")
def int8_bundle(workspace: Path, cli) -> Path:
    out = workspace / "bundle"
    result = cli(
        workspace,
        "export",
        "tinyfactory:make",
        "--recipe",
        "ptq-int8",
        "--calib",
        "calib",
        "--device",
        "x86-cpu-onnxruntime",
        "--format",
        "onnx",
        "--out",
        str(out),
        "--set",
        "samples=16",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_export_writes_a_complete_bundle(int8_bundle: Path):
    names = {path.name for path in int8_bundle.iterdir()}
    assert {"manifest.json", "report.json", "report.md", "model.onnx"} <= names
    manifest = json.loads((int8_bundle / "manifest.json").read_text())
    assert manifest["schema_version"] == 1 and manifest["recipe"]["name"] == "ptq-int8"
    graph = manifest["formats"]["onnx"]["graphs"]["main"]
    assert graph["inputs"][0]["shape"] == [1, 1, 8, 8]
    report = json.loads((int8_bundle / "report.json").read_text())
    onnx = report["formats"]["onnx"]
    assert onnx["verification"]["passed"]
    assert onnx["device_check"]["integer_coverage_count"] == 1.0  # Conv and Gemm both in integer
    assert 0 < onnx["size_ratio"] < 1.0  # int8 weights; graph overhead dominates so tiny a model


def test_run_inspect_and_wrong_shape(cli, workspace: Path, int8_bundle: Path):
    ran = cli(workspace, "run", str(int8_bundle), "--input", "x.npz")
    assert ran.returncode == 0, ran.stderr
    assert "output" in ran.stdout or "[1, 5]" in ran.stdout
    assert cli(workspace, "inspect", str(int8_bundle)).returncode == 0
    wrong = cli(workspace, "run", str(int8_bundle), "--input", "wrong.npz")
    assert wrong.returncode == 2
    assert "has shape [1, 1, 9, 9], the model expects [1, 1, 8, 8]" in wrong.stderr
    assert "Traceback" not in wrong.stderr


def test_mobilequant_takes_a_conv_nets_calibration_budget_unless_set(cli, workspace: Path):
    from edgekit.quantize.mobilequant import FAMILY_BUDGETS

    out = workspace / "mobilequant"
    args = ["export", "tinyfactory:make", "--recipe", "mobilequant-w8a8", "--calib", "calib", "--format", "onnx"]
    result = cli(workspace, *args, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    settings = json.loads((out / "manifest.json").read_text())["recipe"]["settings"]
    assert (settings["samples"], settings["epochs"]) == FAMILY_BUDGETS["convnet"]
    report = json.loads((out / "report.json").read_text())
    assert report["formats"]["onnx"]["verification"]["passed"]


def test_existing_non_empty_dir_is_refused_and_kept(cli, workspace: Path, int8_bundle: Path):
    before = sorted(p.name for p in int8_bundle.iterdir())
    result = cli(workspace, "export", "tinyfactory:make", "--out", str(int8_bundle), "--format", "onnx")
    assert result.returncode == 2 and "is not empty; pass --force" in result.stderr
    assert sorted(p.name for p in int8_bundle.iterdir()) == before


def test_dry_run_writes_nothing(cli, workspace: Path):
    out = workspace / "dry"
    result = cli(workspace, "export", "tinyfactory:make", "--recipe", "ptq-int8", "--out", str(out), "--dry-run")
    assert result.returncode == 0 and "dry run" in result.stdout
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["zoo:nope"], "unknown zoo model 'nope'"),
        (["tinyfactory:make", "--recipe", "nope"], "unknown recipe 'nope'"),
        (["tinyfactory:make", "--device", "nope"], "unknown device 'nope'"),
        (["tinyfactory:make", "--format", "tflite"], "unknown format 'tflite'"),
        (["/no/such/model.pt2"], "no such model path"),
        (["tinyfactory:boom"], "raised RuntimeError: checkpoint missing"),
        (["tinyfactory:make", "--recipe", "ptq-int8", "--calib", "nan"], "contains NaN or Inf"),
        (["tinyfactory:make", "--recipe", "ptq-int8", "--calib", "missing_dir/"], "no such calibration data"),
        (["tinyfactory:make", "--set", "bogus=1"], "unknown setting 'bogus'"),
    ],
)
def test_user_errors_are_one_line_and_write_nothing(cli, workspace: Path, args, message):
    out = workspace / "never"
    result = cli(workspace, "export", "--format", "onnx", *args, "--out", str(out))
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 or result.stderr.strip().splitlines()[-1].startswith("error:")
    assert not out.exists()
    assert not [p for p in workspace.iterdir() if p.name.startswith(".never")]


def test_truncated_model_file_is_a_clear_error(cli, workspace: Path, int8_bundle: Path, tmp_path: Path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(int8_bundle, broken)
    model = broken / "model.onnx"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 3])
    result = cli(workspace, "run", str(broken), "--input", "x.npz")
    assert result.returncode == 2
    assert "not a valid ONNX model" in result.stderr and "Traceback" not in result.stderr


def test_version_flag(edgekit_cli):
    result = edgekit_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("edgekit ")
    assert sys.version_info >= (3, 11)


BLOCKED_RUNTIME = """
import sys, importlib.abc

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        for banned in ("torch", "transformers", "edgekit.exporters", "edgekit.models", "edgekit.pipeline"):
            if name == banned or name.startswith(banned + "."):
                raise ImportError(f"{name} is blocked in the edge runtime")
        return None

sys.meta_path.insert(0, Block())
import numpy as np
import edgekit.runtime as rt

session = rt.load(sys.argv[1], "onnx")
with np.load(sys.argv[2]) as data:
    out = session.run({"x": data["x"]})
print("ok", list(out)[0], next(iter(out.values())).shape)
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
"""


def test_runtime_runs_a_bundle_without_torch(workspace: Path, int8_bundle: Path):
    import subprocess

    result = subprocess.run(
        [sys.executable, "-c", BLOCKED_RUNTIME, str(int8_bundle), str(workspace / "x.npz")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ok logits") or result.stdout.startswith("ok ")
