import sys
from pathlib import Path

import pytest
import torch

from edgekit.errors import EdgekitError
from edgekit.models import load

FACTORY = """
import torch

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, features):
        return self.fc(features)

def make():
    return Net(), (torch.randn(1, 4),)

def boom():
    raise ValueError("weights not found")

def not_a_module():
    return 42
"""


@pytest.fixture
def factory_module(tmp_path: Path, monkeypatch):
    (tmp_path / "user_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "user_factory"
    sys.modules.pop("user_factory", None)


def test_factory_returns_module_and_inputs(factory_module):
    bundle = load(f"{factory_module}:make")
    assert bundle.input_names == ["features"]
    assert bundle.module(**bundle.example_inputs).shape == (1, 3)
    assert len(bundle.source_hash) == 64


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("boom", "raised ValueError: weights not found"),
        ("not_a_module", "not a torch.nn.Module"),
        ("missing", "has no 'missing'"),
    ],
)
def test_factory_errors_are_one_line(factory_module, function, message):
    with pytest.raises(EdgekitError, match=message):
        load(f"{factory_module}:{function}")


def test_unknown_module_and_paths():
    with pytest.raises(EdgekitError, match="cannot import module"):
        load("no_such_pkg_xyz.mod:make")
    with pytest.raises(EdgekitError, match="no such exported program"):
        load("/nonexistent/model.pt2")
    with pytest.raises(EdgekitError, match="cannot resolve model"):
        load("/nonexistent/dir")
    with pytest.raises(EdgekitError, match="unknown zoo model 'nope'"):
        load("zoo:nope")


def test_exported_program_round_trip(tmp_path: Path):
    module = torch.nn.Sequential(torch.nn.Linear(4, 2)).eval()
    program = torch.export.export(module, (torch.randn(1, 4),))
    torch.export.save(program, str(tmp_path / "m.pt2"))
    bundle = load(str(tmp_path / "m.pt2"))
    x = bundle.example_inputs[bundle.input_names[0]]
    torch.testing.assert_close(bundle.module(**bundle.example_inputs), module(x))


def test_corrupt_exported_program(tmp_path: Path):
    (tmp_path / "bad.pt2").write_bytes(b"not a zip")
    with pytest.raises(EdgekitError, match="not a readable torch.export program"):
        load(str(tmp_path / "bad.pt2"))
