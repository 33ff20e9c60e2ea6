"""A checkable visual question task from real labelled images: 2x2 scenes of Fashion-MNIST items.

Each scene places four Fashion-MNIST items (the dataset's own images and labels) in a 2x2 grid
and asks which item sits in one corner; the answer is the item's class name, so correctness is
a string comparison. Training scenes come from the ``calib`` (train) split and evaluation scenes
from ``eval`` (test), so no item image is shared. Scenes are deterministic given (split, index).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgekit.data import fashion_mnist

# short lowercase names an LLM can say (Fashion-MNIST's CLASSES, in order)
NAMES: tuple[str, ...] = (
    "t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot",
)  # fmt: skip
CORNERS: tuple[str, ...] = ("top-left", "top-right", "bottom-left", "bottom-right")
CELL = 28  # Fashion-MNIST's image size: a scene is 56x56 grey pixels


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # [56, 56, 3] uint8 RGB
    labels: tuple[int, int, int, int]  # class per corner, row-major
    corner: int  # the corner asked about
    name: str

    @property
    def question(self) -> str:
        return f"What is in the {CORNERS[self.corner]}?"

    @property
    def answer(self) -> str:
        return NAMES[self.labels[self.corner]]


def scene(split: str, index: int) -> Scene:
    """Scene ``index`` of ``split``: four different random items, a random corner (seeded by index)."""
    images, labels = fashion_mnist.arrays(split)  # type: ignore[arg-type]
    rng = np.random.default_rng([17 if split == "calib" else 23, index])
    picks = rng.choice(len(images), size=4, replace=False)
    canvas = np.zeros((2 * CELL, 2 * CELL), dtype=np.uint8)
    for slot, pick in enumerate(picks):
        row, col = divmod(slot, 2)
        canvas[row * CELL : (row + 1) * CELL, col * CELL : (col + 1) * CELL] = images[pick]
    rgb = np.repeat(canvas[:, :, None], 3, axis=2)
    rgb.setflags(write=False)
    return Scene(rgb, tuple(int(labels[p]) for p in picks), int(rng.integers(4)), f"{split}-scene-{index:05d}")  # type: ignore[arg-type]


def scenes(split: str, count: int, start: int = 0) -> list[Scene]:
    return [scene(split, index) for index in range(start, start + count)]
