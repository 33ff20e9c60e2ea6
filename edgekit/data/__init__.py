"""Datasets the zoo, calibration and benchmarks use, as raw items.

``items(name, split, count)`` returns :class:`Item` objects whose ``raw`` a model's
``preprocess`` turns into inputs. Splits are fixed and never overlap: ``calib`` (calibration
and training) and ``eval``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal

from edgekit.errors import EdgekitError

Split = Literal["calib", "eval"]


@dataclass(frozen=True)
class Item:
    raw: Any
    target: Any = None
    name: str = ""


# dataset name -> "module:function(split, count) -> list[Item]"
READERS: dict[str, str] = {
    "fashion-mnist": "edgekit.data.fashion_mnist:items",
    "wikipedia": "edgekit.data.wikipedia:items",
    "lee": "edgekit.data.lee:items",
    "photos": "edgekit.data.photos:items",
}


def items(name: str, split: Split = "eval", count: int | None = None) -> list[Item]:
    if name not in READERS:
        raise EdgekitError(f"unknown data set '{name}'; known: {', '.join(READERS)}")
    if split not in ("calib", "eval"):
        raise EdgekitError(f"unknown split '{split}' (calib or eval)")
    module_name, function_name = READERS[name].split(":")
    return getattr(importlib.import_module(module_name), function_name)(split, count)
