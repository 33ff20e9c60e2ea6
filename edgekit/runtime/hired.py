"""HiRED token selection on the edge: numpy only, run on an exported encoder's CLS-attention rows.

HiRED (high-resolution early dropping) keeps a fixed budget of visual tokens out of the full image
plus k AnyRes sub-images before they reach the projector and the language model:

1. budget ``N = r·(k+1)·T`` tokens (``T`` tokens per partition);
2. the full image gets ``⌊α·N⌋``; each sub-image a share of the rest proportional to the
   *early*-layer CLS attention (heads summed) over the full-image patches that cover its 2-D region;
3. inside every partition, the top tokens by a *late* layer's CLS attention survive.

The integer allocation is exact: quotas sum to ``N`` and never exceed ``T`` (what a partition
cannot hold flows to the others), so ``r = 1`` keeps every token. The torch side
(:mod:`edgekit.vlm.hired`) reuses :func:`allocate` and must pick the same tokens as :func:`select`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgekit.errors import EdgekitError

PAPER_DEPTH = 24  # CLIP ViT-L/14 in LLaVA-Next; the paper's late layer is 22 of these
PAPER_LATE_LAYER = 22


def scaled_late_layer(depth: int) -> int:
    """The paper's layer 22 of 24, scaled to an encoder of ``depth`` layers (0-based, ≤ depth-1)."""
    return min(depth - 1, max(0, round(PAPER_LATE_LAYER * depth / PAPER_DEPTH)))


@dataclass(frozen=True)
class HiredSettings:
    """HiRED's knobs. Defaults are the paper's: r=0.2, α=0.5, layer 0 and layer 22/24 (scaled)."""

    ratio: float = 0.2  # r: the fraction of all visual tokens kept
    alpha: float = 0.5  # the full image's share of the budget
    early_layer: int = 0  # its CLS attention splits the budget between sub-images
    late_layer: int | None = None  # ranks tokens inside a partition; None = scaled_late_layer(depth)

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio <= 1.0:
            raise EdgekitError(f"HiRED budget ratio must be in (0, 1], got {self.ratio}")
        if not 0.0 <= self.alpha <= 1.0:
            raise EdgekitError(f"HiRED alpha must be in [0, 1], got {self.alpha}")

    def layers(self, depth: int) -> tuple[int, int]:
        """(early, late) 0-based layer indices for an encoder of ``depth`` layers, checked."""
        late = scaled_late_layer(depth) if self.late_layer is None else self.late_layer
        for name, layer in (("early", self.early_layer), ("late", late)):
            if not 0 <= layer < depth:
                raise EdgekitError(f"HiRED {name} layer {layer} is outside the encoder's {depth} layers")
        return self.early_layer, late


def budget(ratio: float, partitions: int, tokens: int) -> int:
    """N = r·partitions·tokens, floored (with a guard against 0.2·320 = 63.99999...)."""
    return min(partitions * tokens, int(math.floor(ratio * partitions * tokens + 1e-9)))


def region_index(patch_grid: tuple[int, int], layout: tuple[int, int]) -> np.ndarray:
    """For each full-image patch (row-major), the sub-image whose 2-D region covers it.

    The sub-images tile the image as ``layout = (rows, cols)`` in row-major order (LLaVA-Next's
    order); full-image patch row ``y`` of ``h`` lies in sub-image row ``⌊y·rows/h⌋`` (same for
    columns), so every patch belongs to exactly one region even when ``h`` is not a multiple of
    ``rows``.
    """
    height, width = patch_grid
    rows, cols = layout
    sub_row = (np.arange(height) * rows) // height
    sub_col = (np.arange(width) * cols) // width
    return (sub_row[:, None] * cols + sub_col[None, :]).reshape(-1)


def region_shares(early_cls: np.ndarray, patch_grid: tuple[int, int], layout: tuple[int, int]) -> np.ndarray:
    """Sum of the full image's early CLS attention (heads summed) over each sub-image's region."""
    scores = _head_sum(early_cls)
    if scores.shape[-1] != patch_grid[0] * patch_grid[1]:
        needed = patch_grid[0] * patch_grid[1]
        raise EdgekitError(f"CLS attention has {scores.shape[-1]} patches, the grid {patch_grid} needs {needed}")
    if layout[0] * layout[1] == 0:  # no sub-images
        return np.zeros(0)
    regions = region_index(patch_grid, layout)
    return np.bincount(regions, weights=scores.astype(np.float64), minlength=layout[0] * layout[1])


def _capped_proportional(total: int, weights: np.ndarray, cap: int) -> np.ndarray:
    """Integers ≤ ``cap`` summing to ``total``, proportional to ``weights`` (largest remainder).

    A share whose ideal exceeds ``cap`` is pinned at ``cap`` and the remainder re-split among
    the others; ties in the remainders go to the lower index, so the result is deterministic.
    """
    count = len(weights)
    if total > count * cap:
        raise EdgekitError(f"cannot place {total} tokens in {count} partitions of {cap}")
    quotas = np.zeros(count, dtype=np.int64)
    free = np.ones(count, dtype=bool)
    remaining = total
    weights = np.clip(np.asarray(weights, dtype=np.float64), 0.0, None)
    while remaining > 0 and free.any():
        w = np.where(free, weights, 0.0)
        if w.sum() <= 0.0:  # no attention left on the free partitions: split them evenly
            w = free.astype(np.float64)
        ideal = remaining * w / w.sum()
        over = free & (ideal >= cap)
        if over.any():
            quotas[over] = cap
            free &= ~over
            remaining = total - int(quotas.sum())
            continue
        floors = np.floor(ideal).astype(np.int64)
        leftover = remaining - int(floors[free].sum())
        order = np.lexsort((np.arange(count), -(ideal - floors)))  # largest remainder, then index
        order = order[free[order]]
        floors[order[:leftover]] += 1
        quotas[free] = floors[free]
        remaining = 0
    return quotas


def allocate(shares: np.ndarray, tokens: int, settings: HiredSettings) -> np.ndarray:
    """Per-partition token quotas [full, sub_0, ..., sub_{k-1}] summing exactly to the budget N.

    ``shares`` are the sub-images' early-attention masses (:func:`region_shares`); ``tokens`` is
    T, the tokens per partition. Without sub-images the full image takes the whole budget.
    """
    shares = np.asarray(shares, dtype=np.float64).reshape(-1)
    subs = len(shares)
    total = budget(settings.ratio, subs + 1, tokens)
    full = total if subs == 0 else min(tokens, int(math.floor(settings.alpha * total + 1e-9)))
    rest = total - full
    if rest > subs * tokens:  # the sub-images are full: the overflow goes back to the full image
        full += rest - subs * tokens
        rest = subs * tokens
    return np.concatenate([[full], _capped_proportional(rest, shares, tokens)]).astype(np.int64)


def top_tokens(scores: np.ndarray, count: int) -> np.ndarray:
    """Indices of the ``count`` highest scores, in ascending (spatial) order.

    Ties go to the lower index (a stable sort on the negated scores), the rule the torch side uses.
    """
    order = np.argsort(-np.asarray(scores, dtype=np.float32), kind="stable")
    return np.sort(order[: int(count)])


def _head_sum(attention: np.ndarray) -> np.ndarray:
    """[P] CLS-attention row, from [P] (already head-summed) or [heads, P]."""
    array = np.asarray(attention, dtype=np.float32)
    if array.ndim == 2:
        return array.sum(axis=0, dtype=np.float32)
    if array.ndim != 1:
        raise EdgekitError(f"a CLS-attention row must be [patches] or [heads, patches], got {list(array.shape)}")
    return array


def select(
    early_cls_full: np.ndarray,
    late_cls: np.ndarray,
    patch_grid: tuple[int, int],
    layout: tuple[int, int],
    settings: HiredSettings = HiredSettings(),
) -> list[np.ndarray]:
    """Kept token indices per partition (full image first, then the sub-images row-major).

    ``early_cls_full``: the full image's early-layer CLS attention over its patches, [P] or
    [heads, P]. ``late_cls``: every partition's late-layer CLS attention, [k+1, P] or
    [k+1, heads, P]. Indices are patch positions (CLS excluded), ascending.
    """
    late = np.asarray(late_cls, dtype=np.float32)
    late = late.sum(axis=1, dtype=np.float32) if late.ndim == 3 else late
    partitions = layout[0] * layout[1] + 1
    tokens = patch_grid[0] * patch_grid[1]
    if late.shape != (partitions, tokens):
        raise EdgekitError(
            f"late CLS attention is {list(late.shape)}; layout {layout} and grid {patch_grid} "
            f"need [{partitions}, {tokens}]"
        )
    quotas = allocate(region_shares(early_cls_full, patch_grid, layout), tokens, settings)
    return [top_tokens(late[index], quota) for index, quota in enumerate(quotas)]


def gather(features: np.ndarray, kept: list[np.ndarray]) -> np.ndarray:
    """Concatenate each partition's kept token features: [k+1, T, D] -> [Σ kept, D]."""
    return np.concatenate([features[index, keep] for index, keep in enumerate(kept)], axis=0)


ENCODER_CONFIG = "hired.json"
ENCODER_OUTPUTS = ("patch_features", "cls_attention_early", "cls_attention_late")


class HiredEncoder:
    """An exported HiRED encoder (``edgekit.vlm.export``) run in onnxruntime, plus the selection.

    ``__call__(pixel_values[k+1, 3, H, W], layout, ratio)`` returns the kept tokens' features
    [Σ kept, D] and the kept indices per partition: what goes on to the projector and the LLM.
    """

    def __init__(self, directory, threads: int | None = None) -> None:
        import json
        from pathlib import Path

        from edgekit.runtime.backends import OnnxBackend

        directory = Path(directory)
        path = directory / ENCODER_CONFIG
        if not path.is_file():
            raise EdgekitError(f"{directory} holds no {ENCODER_CONFIG}: not a HiRED encoder export")
        self.config = json.loads(path.read_text())
        self.patch_grid = tuple(self.config["patch_grid"])
        self.backend = OnnxBackend(directory / self.config["file"], threads)

    def encode(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        """The graph's three outputs for a stack of partitions."""
        return self.backend.run({"pixel_values": np.ascontiguousarray(pixel_values, dtype=np.float32)})

    def __call__(
        self, pixel_values: np.ndarray, layout: tuple[int, int], ratio: float = 0.2, alpha: float = 0.5
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        out = self.encode(pixel_values)
        settings = HiredSettings(ratio, alpha, self.config["early_layer"], self.config["late_layer"])
        early, late = out["cls_attention_early"], out["cls_attention_late"]
        kept = select(early[0], late, self.patch_grid, layout, settings)
        return gather(out["patch_features"], kept), kept
