"""verify.compare and onnx_session."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from edgekit.errors import EdgekitError
from edgekit.exporters.onnx import save_sharing_weights
from edgekit.exporters.verify import compare, onnx_session, run


def test_classifier_agreement_is_over_the_batch():
    reference = np.array([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0]])
    candidate = reference.copy()
    candidate[2] = [0.0, 5.0, 0.0]  # one of four rows changes its arg-max
    result = compare(reference, candidate, "classifier")
    assert result["top1_agreement"] == 0.75
    assert result["max_abs"] == 5.0 and result["finite"]
    assert "cosine" not in result


def test_causal_lm_agreement_is_over_positions():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(1, 10, 50))
    candidate = reference.copy()
    candidate[0, 3] = -candidate[0, 3]  # flips that position's next-token choice
    result = compare(reference, candidate, "causal-lm")
    assert result["top1_agreement"] == pytest.approx(0.9)
    assert compare(reference, reference, "causal-lm")["sqnr_db"] == float("inf")


def test_encoder_cosine_and_cls():
    rng = np.random.default_rng(1)
    reference = rng.normal(size=(2, 5, 16))
    candidate = reference + 0.01 * rng.normal(size=reference.shape)
    result = compare(reference, candidate, "vision-encoder")
    assert 0.999 < result["cosine"] <= 1.0 and 0.999 < result["cls_cosine"] <= 1.0
    assert 30 < result["sqnr_db"] < 50
    text = compare(reference[:, 0], -reference[:, 0], "text-encoder")
    assert text["cosine"] == pytest.approx(-1.0)


def test_non_finite_and_shape_mismatch():
    reference = np.ones((2, 3))
    bad = reference.copy()
    bad[0, 0] = np.nan
    result = compare(reference, bad, "generic")
    assert not result["finite"] and np.isnan(result["sqnr_db"])
    with pytest.raises(EdgekitError, match="shape"):
        compare(reference, np.ones((3, 2)), "generic")


def test_onnx_session_on_truncated_missing_and_good_files(tmp_path, exported):
    bundle, export = exported("mlp", "fp32")
    data = export.main.path.read_bytes()
    broken = tmp_path / "model.onnx"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(EdgekitError, match=r"model\.onnx is not a valid ONNX file \(truncated\?\)"):
        onnx_session(broken)
    with pytest.raises(EdgekitError, match="no such ONNX file"):
        onnx_session(tmp_path / "absent.onnx")
    session = onnx_session(export.main.path, threads=1)
    (out,) = run(session, {"features": np.zeros((3, 32), dtype=np.float64)})  # cast to float32
    assert out.shape == (3, 10)
    with pytest.raises(EdgekitError, match="missing inputs"):
        run(session, {})


def test_missing_external_weights_is_a_user_error(tmp_path, exported):
    _, export = exported("mlp", "fp32")
    save_sharing_weights({"model": onnx.load(str(export.main.path))}, tmp_path, "weights.bin")
    assert onnx_session(tmp_path / "model.onnx") is not None
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(EdgekitError, match="external weights"):
        onnx_session(tmp_path / "model.onnx")
