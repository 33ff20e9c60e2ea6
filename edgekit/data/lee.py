"""The Lee news corpus from gensim's test data: 300 short news articles, one per line.

Fixed split: every fifth article (line index 4, 9, ...) is ``eval``, the rest ``calib``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from edgekit.data import Item
from edgekit.errors import EdgekitError

CORPUS = "test/test_data/lee_background.cor"
EVAL_EVERY = 5


def corpus_path() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise EdgekitError("the lee data set needs gensim's test data: pip install --no-deps gensim==4.4.0")
    path = Path(spec.submodule_search_locations[0]) / CORPUS
    if not path.is_file():
        raise EdgekitError(f"{path} is missing; reinstall gensim")
    return path


def lines() -> list[str]:
    """Every non-empty article, whitespace-normalised, in file order."""
    text = corpus_path().read_text(encoding="utf-8", errors="replace")
    return [" ".join(line.split()) for line in text.splitlines() if line.strip()]


def items(split: str, count: int | None = None) -> list[Item]:
    if split not in ("calib", "eval"):
        raise EdgekitError(f"unknown split '{split}' (calib or eval)")
    wanted = split == "eval"
    chosen = [
        Item(raw=line, name=f"lee-{index:03d}")
        for index, line in enumerate(lines())
        if (index % EVAL_EVERY == EVAL_EVERY - 1) == wanted
    ]
    return chosen if count is None else chosen[: max(0, int(count))]
