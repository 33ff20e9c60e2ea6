"""The IDX reader on files written here (good, truncated, corrupt) and on the real data set."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from edgekit.data import fashion_mnist, items
from edgekit.errors import EdgekitError


def write_idx(path: Path, array: np.ndarray, *, truncate: int = 0, magic_type: int = 0x08) -> Path:
    header = bytes([0, 0, magic_type, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    payload = payload[: len(payload) - truncate] if truncate else payload
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as handle:
        handle.write(payload)
    return path


def tiny_dataset(directory: Path, n: int = 4, labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = np.arange(n) % 10 if labels is None else labels
    for split in ("calib", "eval"):
        image_file, label_file = fashion_mnist.FILES[split]
        write_idx(directory / image_file, images)
        write_idx(directory / label_file, labels)
    return images, labels


def test_read_idx_round_trip(tmp_path: Path) -> None:
    images = np.arange(2 * 28 * 28, dtype=np.int64).reshape(2, 28, 28) % 256
    path = write_idx(tmp_path / "x-idx3-ubyte.gz", images)
    read = fashion_mnist.read_idx(path, expect_ndim=3)
    assert read.dtype == np.uint8 and read.shape == (2, 28, 28)
    np.testing.assert_array_equal(read, images)
    plain = write_idx(tmp_path / "y-idx1-ubyte", np.array([3, 1, 4]))
    np.testing.assert_array_equal(fashion_mnist.read_idx(plain), [3, 1, 4])


@pytest.mark.parametrize(
    "kind, match",
    [
        ("truncated", "truncated"),
        ("magic", "magic"),
        ("ndim", "dimensions"),
        ("gzip", "cannot read"),
        ("empty", "magic"),
    ],
)
def test_read_idx_rejects_bad_files(tmp_path: Path, kind: str, match: str) -> None:
    path = tmp_path / "bad.gz"
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    if kind == "truncated":
        write_idx(path, images, truncate=100)
    elif kind == "magic":
        write_idx(path, images, magic_type=0x42)
    elif kind == "ndim":
        write_idx(path, np.zeros(5, dtype=np.uint8))
    elif kind == "gzip":
        path.write_bytes(b"\x1f\x8b\x08\x00 this is not really gzip data")
    else:
        path.write_bytes(gzip.compress(b""))
    with pytest.raises(EdgekitError, match=match):
        fashion_mnist.read_idx(path, expect_ndim=3)


def test_env_var_directory_and_items(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images, labels = tiny_dataset(tmp_path)
    monkeypatch.setenv(fashion_mnist.ENV_VAR, str(tmp_path))
    got_images, got_labels = fashion_mnist.arrays("eval")
    np.testing.assert_array_equal(got_images, images)
    assert got_labels.dtype == np.int64 and list(got_labels) == list(labels)
    three = items("fashion-mnist", "calib", 3)
    assert [item.target for item in three] == [0, 1, 2]
    assert three[1].raw.shape == (28, 28) and three[1].raw.dtype == np.uint8


def test_missing_directory_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fashion_mnist.ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(EdgekitError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist.arrays("calib")


def test_labels_out_of_range_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny_dataset(tmp_path, labels=np.array([0, 1, 12, 3]))
    monkeypatch.setenv(fashion_mnist.ENV_VAR, str(tmp_path))
    with pytest.raises(EdgekitError, match="not a class"):
        fashion_mnist.arrays("calib")


def test_real_fashion_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(fashion_mnist.ENV_VAR, raising=False)
    test_images, test_labels = fashion_mnist.arrays("eval")
    assert test_images.shape == (10_000, 28, 28) and test_images.dtype == np.uint8
    assert np.bincount(test_labels).tolist() == [1000] * 10
    train_images, _ = fashion_mnist.arrays("calib")
    assert train_images.shape == (60_000, 28, 28)
    assert abs(train_images.mean() / 255 - 0.2860) < 1e-3  # the normalisation the zoo models use
    assert len(fashion_mnist.CLASSES) == 10
    assert [item.name for item in fashion_mnist.items("eval", 2)] == ["eval-00000", "eval-00001"]
