"""The 1000 ImageNet-1k class names in the standard index order, shipped as data.

Names follow the usual PyTorch list (``imagenet_classes.txt``: first WordNet lemma, underscores
as spaces). Two names occur twice in that list because ImageNet has two synsets each
("crane" 134 the bird / 517 the machine, "maillot" 638 / 639); look those up by index.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from edgekit.errors import EdgekitError

CLASSES_FILE = Path(__file__).with_name("imagenet_classes.txt")


@lru_cache(maxsize=1)
def classes() -> tuple[str, ...]:
    names = tuple(line.strip() for line in CLASSES_FILE.read_text().splitlines() if line.strip())
    if len(names) != 1000:
        raise RuntimeError(f"{CLASSES_FILE} holds {len(names)} names, not 1000")
    return names


def index(name: str) -> int:
    """Index of a class name; ambiguous or unknown names raise EdgekitError."""
    hits = [i for i, known in enumerate(classes()) if known == name]
    if len(hits) != 1:
        problem = "is not an ImageNet class" if not hits else f"is ambiguous (indices {hits})"
        raise EdgekitError(f"'{name}' {problem}")
    return hits[0]
