"""PteProgram: numpy in/out over the real ExecuTorch runtime, clear errors for bad files and inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgekit.errors import EdgekitError
from edgekit.exporters.executorch import export_pte
from edgekit.models.bundle import ModelBundle
from edgekit.runtime.pte import PteProgram


@pytest.fixture(scope="module")
def mlp_pte(mlp_bundle: ModelBundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_pte(mlp_bundle, tmp_path_factory.mktemp("mlp_fp32")).path


def test_metadata_and_dict_or_list_inputs(mlp_pte: Path) -> None:
    program = PteProgram(mlp_pte, ["features"])
    assert [(t.dtype, t.shape) for t in program.inputs] == [("float32", (4, 32))]
    assert [(t.dtype, t.shape) for t in program.outputs] == [("float32", (4, 10))]
    assert "XnnpackBackend" in program.backends
    x = np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)
    (by_name,) = program.run({"features": x})
    (by_position,) = program.run([x])
    assert by_name.dtype == np.float32 and by_name.shape == (4, 10)
    np.testing.assert_array_equal(by_name, by_position)
    (from_float64,) = program.run([x.astype(np.float64)])  # safely cast to the program's dtype
    np.testing.assert_array_equal(from_float64, by_name)


@pytest.mark.parametrize("keep", [0, 16, 0.5, -100])
def test_truncated_pte_is_a_clear_error(mlp_pte: Path, tmp_path: Path, keep: float) -> None:
    data = mlp_pte.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else (len(data) + keep if keep < 0 else keep)
    bad = tmp_path / "model.pte"
    bad.write_bytes(data[:cut])
    with pytest.raises(EdgekitError, match="not a valid ExecuTorch program"):
        PteProgram(bad)


def test_garbage_and_missing_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pte"
    garbage.write_bytes(b"not a program" * 100)
    with pytest.raises(EdgekitError, match="not a valid ExecuTorch program"):
        PteProgram(garbage)
    with pytest.raises(EdgekitError, match="no ExecuTorch program"):
        PteProgram(tmp_path / "absent.pte")


def test_bad_inputs_are_user_errors(mlp_pte: Path) -> None:
    program = PteProgram(mlp_pte, ["features"])
    with pytest.raises(EdgekitError, match=r"shape \[2, 32\]"):
        program.run({"features": np.zeros((2, 32), np.float32)})
    with pytest.raises(EdgekitError, match="missing input 'features'"):
        program.run({"x": np.zeros((4, 32), np.float32)})
    with pytest.raises(EdgekitError, match="NaN"):
        program.run([np.full((4, 32), np.nan, np.float32)])
    with pytest.raises(EdgekitError, match="takes 1 inputs"):
        program.run([np.zeros((4, 32), np.float32)] * 2)
    with pytest.raises(EdgekitError, match="no method 'decode'"):
        PteProgram(mlp_pte, method="decode")
