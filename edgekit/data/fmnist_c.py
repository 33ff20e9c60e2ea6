"""Fashion-MNIST-C: the ImageNet-C corruption families that make sense for 28x28 grey images.

Made here (there is no published Fashion-MNIST-C with ImageNet-C's families) from the real
Fashion-MNIST test set, with a fixed seed per corruption and severity so every method sees the
same stream. Severity parameters follow Hendrycks & Dietterich's ImageNet-C code, rescaled where
the image size matters (blur radii, pixelation, elastic displacement), so severity 5 is severe
but the garment is still recognisable to a person.

Images are float32 in [0, 1], shape [N, 1, 28, 28]; ``load(corruption, severity)`` caches them.
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np

from edgekit.cache import cached_entry
from edgekit.errors import EdgekitError

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
LABELS = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
SEED = 20240507


def _read_idx(path: Path) -> np.ndarray:
    if not path.is_file():
        raise EdgekitError(f"Fashion-MNIST file missing: {path} (run scripts/ensure-fashion-mnist.sh)")
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def raw_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The real Fashion-MNIST ``train`` or ``test`` images (float32 [N,1,28,28] in [0,1]) and labels."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images = _read_idx(DATA_DIR / f"{prefix}-images-idx3-ubyte.gz").astype(np.float32) / 255.0
    labels = _read_idx(DATA_DIR / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    return images[:, None], labels


# -- corruptions: each takes a [N,28,28] float image batch in [0,1], a severity 1..5 and an rng ----------
def gaussian_noise(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    c = [0.08, 0.12, 0.18, 0.26, 0.38][s - 1]
    return x + rng.normal(size=x.shape) * c


def shot_noise(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    c = [60, 25, 12, 5, 3][s - 1]
    return rng.poisson(x * c) / c


def impulse_noise(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    amount = [0.03, 0.06, 0.09, 0.17, 0.27][s - 1]
    out = x.copy()
    draw = rng.random(x.shape)
    out[draw < amount / 2] = 0.0
    out[(draw >= amount / 2) & (draw < amount)] = 1.0
    return out


def _disk_kernel(radius: float) -> np.ndarray:
    size = int(np.ceil(radius)) * 2 + 1
    grid = np.arange(size) - size // 2
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    kernel = ((xx**2 + yy**2) <= radius**2).astype(np.float64)
    return kernel / kernel.sum()


def defocus_blur(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    from scipy.ndimage import convolve

    radius = [1.0, 1.3, 1.7, 2.1, 2.5][s - 1]
    kernel = _disk_kernel(radius)[None]
    return convolve(x, kernel, mode="reflect")


def gaussian_blur(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    sigma = [0.5, 0.75, 1.0, 1.3, 1.7][s - 1]
    return gaussian_filter(x, sigma=(0, sigma, sigma), mode="reflect")


def contrast(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    c = [0.4, 0.3, 0.2, 0.1, 0.05][s - 1]
    means = x.mean(axis=(1, 2), keepdims=True)
    return (x - means) * c + means


def brightness(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    c = [0.1, 0.2, 0.3, 0.4, 0.5][s - 1]
    return x + c  # grey images: ImageNet-C adds c to the HSV value channel, i.e. to the intensity


def pixelate(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    c = [0.8, 0.65, 0.5, 0.4, 0.3][s - 1]
    small = max(2, int(28 * c))
    out = np.empty_like(x)
    for i, image in enumerate(x):
        pil = Image.fromarray(np.uint8(np.clip(image, 0, 1) * 255))
        pil = pil.resize((small, small), Image.BOX).resize((28, 28), Image.BOX)
        out[i] = np.asarray(pil, dtype=np.float32) / 255.0
    return out


def jpeg_compression(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    quality = [25, 18, 15, 10, 7][s - 1]
    out = np.empty_like(x)
    for i, image in enumerate(x):
        buffer = io.BytesIO()
        Image.fromarray(np.uint8(np.clip(image, 0, 1) * 255)).save(buffer, "JPEG", quality=quality)
        buffer.seek(0)
        out[i] = np.asarray(Image.open(buffer), dtype=np.float32) / 255.0
    return out


def elastic_transform(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    from scipy.ndimage import gaussian_filter, map_coordinates

    alpha, sigma = [(0.6, 4.0), (0.9, 3.5), (1.2, 3.5), (1.5, 3.0), (1.8, 3.0)][s - 1]
    out = np.empty_like(x)
    yy, xx = np.meshgrid(np.arange(28), np.arange(28), indexing="ij")
    for i, image in enumerate(x):
        dx, dy = (gaussian_filter(rng.uniform(-1, 1, (28, 28)), sigma) for _ in range(2))
        dx, dy = (d / (d.std() + 1e-6) * alpha for d in (dx, dy))  # displacement std in pixels
        out[i] = map_coordinates(image, [yy + dy, xx + dx], order=1, mode="reflect")
    return out


def fog(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    """Low-frequency haze (a plasma-like field from smoothed noise), as ImageNet-C's fog."""
    from scipy.ndimage import gaussian_filter

    strength, smooth = [(0.3, 3), (0.45, 3), (0.6, 2.5), (0.75, 2.5), (0.9, 2)][s - 1]
    field = gaussian_filter(rng.random(x.shape), sigma=(0, smooth, smooth))
    field = (field - field.min(axis=(1, 2), keepdims=True)) / (np.ptp(field, axis=(1, 2), keepdims=True) + 1e-6)
    peak = x.max(axis=(1, 2), keepdims=True)
    return (x + strength * field) * peak / (peak + strength)


CORRUPTIONS = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur,
    "gaussian_blur": gaussian_blur,
    "contrast": contrast,
    "brightness": brightness,
    "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
    "elastic_transform": elastic_transform,
    "fog": fog,
}


def corrupt(images: np.ndarray, corruption: str, severity: int, seed: int = SEED) -> np.ndarray:
    """Apply one corruption at one severity to float [N,1,28,28] images; deterministic for a seed."""
    if corruption not in CORRUPTIONS:
        raise EdgekitError(f"unknown corruption '{corruption}'; known: {', '.join(CORRUPTIONS)}")
    if severity not in (1, 2, 3, 4, 5):
        raise EdgekitError(f"severity must be 1..5, got {severity}")
    rng = np.random.default_rng([seed, list(CORRUPTIONS).index(corruption), severity])
    out = CORRUPTIONS[corruption](images[:, 0].astype(np.float64), severity, rng)
    return np.clip(out, 0.0, 1.0).astype(np.float32)[:, None]


def load(corruption: str, severity: int, count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Corrupted test images (float32 [N,1,28,28]) and labels, in the test set's fixed order, cached."""
    if corruption not in CORRUPTIONS:
        raise EdgekitError(f"unknown corruption '{corruption}'; known: {', '.join(CORRUPTIONS)}")

    def build(directory: Path) -> None:
        images, labels = raw_split("test")
        corrupted = corrupt(images, corruption, severity)
        np.savez(directory / "data.npz", images=np.uint8(np.round(corrupted * 255)), labels=labels.astype(np.uint8))

    entry = cached_entry(f"fmnist-c/{corruption}-{severity}-{SEED}", build)
    with np.load(entry / "data.npz") as data:
        images = data["images"].astype(np.float32) / 255.0
        labels = data["labels"].astype(np.int64)
    if count is not None:
        images, labels = images[:count], labels[:count]
    return images, labels


def items(split: str, count: int | None = None, corruption: str = "gaussian_noise", severity: int = 5) -> list:
    """Registry reader: ``fmnist-c`` eval items (raw = float [1,28,28] image, target = label)."""
    from edgekit.data import Item

    images, labels = load(corruption, severity, count)
    return [
        Item(raw=image, target=int(label), name=f"{corruption}-{severity}-{i}")
        for i, (image, label) in enumerate(zip(images, labels, strict=True))
    ]
