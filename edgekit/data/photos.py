"""Real photos that install offline (scikit-image, scikit-learn, matplotlib samples).

``eval`` holds the photos that show an ImageNet class, labelled in ``photo_labels.json`` with
the *set* of acceptable ImageNet indices (a tuple, sorted) as ``target``; ``calib`` holds the
other photos and the 200 ``lfw_subset`` faces (target ``None``). The splits never overlap.
Every ``raw`` is HxWx3 uint8 RGB (grey photos are replicated to three channels).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import cache, lru_cache
from pathlib import Path

import numpy as np

from edgekit.data import Item, Split
from edgekit.data.imagenet import classes
from edgekit.errors import EdgekitError

LABELS_FILE = Path(__file__).with_name("photo_labels.json")


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        import skimage.data

        image = getattr(skimage.data, name)()
        return image[0] if isinstance(image, tuple) else image  # stereo pairs: the left view

    return read


def _sklearn(filename: str) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(filename)

    return read


def _matplotlib(filename: str) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        from matplotlib import cbook
        from PIL import Image

        with Image.open(cbook.get_sample_data(filename, asfileobj=False)) as picture:
            return np.asarray(picture.convert("RGB"))

    return read


SOURCES: dict[str, Callable[[], np.ndarray]] = {
    "chelsea": _skimage("chelsea"),
    "coffee": _skimage("coffee"),
    "rocket": _skimage("rocket"),
    "grace_hopper": _matplotlib("grace_hopper.jpg"),
    "china": _sklearn("china.jpg"),
    "camera": _skimage("camera"),
    "clock": _skimage("clock"),
    "astronaut": _skimage("astronaut"),
    "flower": _sklearn("flower.jpg"),
    "motorcycle": _skimage("stereo_motorcycle"),
    "coins": _skimage("coins"),
}


def rgb(image: np.ndarray) -> np.ndarray:
    """HxW grey, HxWx3 RGB or HxWx4 RGBA; uint8 or float in [0,1] -> HxWx3 uint8."""
    array = np.asarray(image)
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
            raise EdgekitError(f"image must be uint8 or finite float in [0,1], got {array.dtype}")
        array = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise EdgekitError(f"image must be HxW or HxWx3, got shape {array.shape}")
    return np.ascontiguousarray(array[:, :, :3])


@lru_cache(maxsize=1)
def labels() -> dict:
    """The label file, with every index checked against the ImageNet class list."""
    table = json.loads(LABELS_FILE.read_text())
    names = classes()
    for entry in table["labelled"]:
        for index, name in entry["imagenet"].items():
            if names[int(index)] != name:
                raise RuntimeError(
                    f"{LABELS_FILE}: {entry['name']}: class {index} is '{names[int(index)]}', not '{name}'"
                )
    return table


def targets() -> dict[str, tuple[int, ...]]:
    """Photo name -> sorted tuple of acceptable ImageNet indices, for the labelled photos."""
    return {entry["name"]: tuple(sorted(int(i) for i in entry["imagenet"])) for entry in labels()["labelled"]}


@cache
def photo(name: str) -> np.ndarray:
    """One named photo as HxWx3 uint8 (read-only, cached)."""
    if name not in SOURCES:
        raise EdgekitError(f"unknown photo '{name}'; known: {', '.join(SOURCES)}")
    image = rgb(SOURCES[name]())
    image.setflags(write=False)
    return image


@lru_cache(maxsize=1)
def faces() -> np.ndarray:
    """The 200 lfw_subset faces as [200,25,25,3] uint8."""
    from skimage.data import lfw_subset

    stack = np.stack([rgb(face) for face in lfw_subset()])
    stack.setflags(write=False)
    return stack


def is_correct(logits: np.ndarray | Sequence[float], target: tuple[int, ...] | int) -> bool:
    """Whether the arg-max of ``logits`` is one of the acceptable classes in ``target``."""
    accepted = (target,) if isinstance(target, int) else tuple(target)
    return int(np.asarray(logits).reshape(-1).argmax()) in accepted


def items(split: Split, count: int | None = None) -> list[Item]:
    table = labels()
    if split == "eval":
        wanted = targets()
        out = [Item(raw=photo(name), target=target, name=name) for name, target in wanted.items()]
    elif split == "calib":
        out = [Item(raw=photo(entry["name"]), name=entry["name"]) for entry in table["unlabelled"]]
        out += [Item(raw=face, name=f"lfw-{i:03d}") for i, face in enumerate(faces())]
    else:
        raise EdgekitError(f"unknown split '{split}' (calib or eval)")
    return out if count is None else out[: int(count)]
