"""Fashion-MNIST from its IDX gz files (Debian package ``dataset-fashion-mnist``).

The reader is plain numpy so it works wherever edgekit does; it checks the IDX magic numbers,
the dimensions and the payload size, because a truncated download otherwise turns into
silently garbled images. ``calib`` is the 60k training set (calibration and training),
``eval`` the 10k test set, so the two never overlap.
"""

from __future__ import annotations

import gzip
import os
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np

from edgekit.data import Item, Split
from edgekit.errors import EdgekitError

ENV_VAR = "EDGEKIT_FASHION_MNIST"
DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES: list[str] = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
FILES: dict[str, tuple[str, str]] = {
    "calib": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "eval": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SIZES = {"calib": 60_000, "eval": 10_000}
# IDX type byte -> numpy dtype (big-endian where it matters), per the IDX format description
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def data_dir() -> Path:
    """``$EDGEKIT_FASHION_MNIST`` or the Debian package's directory; it must hold the four files."""
    directory = Path(os.environ.get(ENV_VAR) or DEFAULT_DIR)
    missing = [name for pair in FILES.values() for name in pair if not (directory / name).is_file()]
    if missing:
        raise EdgekitError(
            f"Fashion-MNIST not found in {directory} (missing {missing[0]}): "
            f"run `apt-get install dataset-fashion-mnist` or set {ENV_VAR} to the folder of IDX gz files"
        )
    return directory


def read_idx(path: Path, expect_ndim: int | None = None) -> np.ndarray:
    """One IDX file (gzipped or not) as an array; malformed or truncated files raise EdgekitError."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as handle:
            payload = handle.read()
    except (OSError, EOFError, zlib.error) as error:
        raise EdgekitError(f"{path}: cannot read IDX file ({error})") from None
    if len(payload) < 4 or payload[0] != 0 or payload[1] != 0 or payload[2] not in _IDX_DTYPES:
        raise EdgekitError(f"{path}: not an IDX file (bad magic number)")
    ndim = payload[3]
    if ndim == 0 or (expect_ndim is not None and ndim != expect_ndim):
        raise EdgekitError(f"{path}: IDX file has {ndim} dimensions, expected {expect_ndim}")
    header = 4 + 4 * ndim
    if len(payload) < header:
        raise EdgekitError(f"{path}: IDX header truncated")
    shape = tuple(int(d) for d in np.frombuffer(payload, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[payload[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(payload) - header != expected:
        raise EdgekitError(
            f"{path}: IDX payload is {len(payload) - header} bytes but shape {shape} needs {expected} (truncated?)"
        )
    return np.frombuffer(payload, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


@lru_cache(maxsize=2)
def _load(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_name, labels_name = FILES[split]
    images = read_idx(Path(directory) / images_name, expect_ndim=3)
    labels = read_idx(Path(directory) / labels_name, expect_ndim=1)
    if images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise EdgekitError(f"{directory}/{images_name}: expected uint8 28x28 images, got {images.shape}")
    if images.shape[0] != labels.shape[0]:
        raise EdgekitError(f"{directory}: {images.shape[0]} images but {labels.shape[0]} labels in {split}")
    if labels.size and int(labels.max()) >= len(CLASSES):
        raise EdgekitError(f"{directory}/{labels_name}: label {int(labels.max())} is not a class 0-9")
    images.setflags(write=False)
    labels = labels.astype(np.int64)
    labels.setflags(write=False)
    return images, labels


def arrays(split: Split) -> tuple[np.ndarray, np.ndarray]:
    """The whole split at once (read-only): images uint8 [N,28,28], labels int64 [N]; for training loops."""
    if split not in FILES:
        raise EdgekitError(f"unknown split '{split}' (calib or eval)")
    return _load(str(data_dir()), split)


def items(split: Split, count: int | None = None) -> list[Item]:
    """The first ``count`` images of ``split`` as Items (raw uint8 [28,28], target int label)."""
    images, labels = arrays(split)
    n = len(images) if count is None else min(int(count), len(images))
    return [Item(raw=images[i], target=int(labels[i]), name=f"{split}-{i:05d}") for i in range(n)]
