"""Fashion-MNIST-C: every family changes the images, deterministically, harder with severity."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.data import fmnist_c
from edgekit.errors import EdgekitError


@pytest.fixture(scope="module")
def clean() -> np.ndarray:
    return fmnist_c.raw_split("test")[0][:16]


def test_real_test_set_shape() -> None:
    images, labels = fmnist_c.raw_split("test")
    assert images.shape == (10000, 1, 28, 28) and images.dtype == np.float32
    assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))
    assert images.min() >= 0.0 and images.max() <= 1.0


@pytest.mark.parametrize("corruption", list(fmnist_c.CORRUPTIONS))
def test_each_corruption_is_deterministic_and_grows_with_severity(clean: np.ndarray, corruption: str) -> None:
    mild = fmnist_c.corrupt(clean, corruption, 1)
    severe = fmnist_c.corrupt(clean, corruption, 5)
    assert severe.shape == clean.shape and severe.dtype == np.float32
    assert severe.min() >= 0.0 and severe.max() <= 1.0
    np.testing.assert_array_equal(severe, fmnist_c.corrupt(clean, corruption, 5))  # fixed seed
    distance_mild = np.abs(mild - clean).mean()
    distance_severe = np.abs(severe - clean).mean()
    assert distance_mild > 1e-3
    assert distance_severe > distance_mild


def test_unknown_names_are_user_errors(clean: np.ndarray) -> None:
    with pytest.raises(EdgekitError):
        fmnist_c.corrupt(clean, "snow-on-mars", 3)
    with pytest.raises(EdgekitError):
        fmnist_c.corrupt(clean, "contrast", 6)


def test_load_caches_a_stream(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path))
    x, y = fmnist_c.load("brightness", 2, count=100)
    assert x.shape == (100, 1, 28, 28) and y.shape == (100,)
    assert (tmp_path / "fmnist-c").is_dir()
    again, _ = fmnist_c.load("brightness", 2, count=100)
    np.testing.assert_array_equal(x, again)
