"""Per-token dynamic inference: its perplexity, its cost, and thresholds calibrated for both.

How perplexity is measured for per-token exits. Text is scored teacher-forced with the sliding
windows of :func:`edgekit.evaluate.perplexity`. At each position the dynamic model exits at the
first enabled depth whose top-token probability reaches that depth's threshold (the full depth
always accepts), and the position's true next token is scored with *that depth's* distribution.
This is exactly what the runtime's dynamic model assigns the token: its KV cache is kept exact
(skipped layers are recomputed, see :mod:`edgekit.runtime.sorted`), so a depth's hidden state at a
position depends only on the true prefix, never on where earlier tokens exited. One pass that keeps
every depth's (top-token probability, NLL) per position therefore scores any threshold setting.

How thresholds are calibrated. On calibration text (never the evaluation text), a greedy search
walks from "never exit" (the full model) towards cheaper settings: each move lowers one exit's
threshold to a grid value, taking the move that saves the most predicted decode time per unit of
log-perplexity it adds. The walk is the tokens/s-vs-perplexity curve; the calibrated setting is
its fastest point within ``max_ratio`` × the full model's calibration perplexity. Predicted time
per token comes from measured component latencies (:class:`DecodeCost`): the segments a token
runs, the LM head at every enabled exit it reaches (the head is as large as ~8 SmolLM2 layers,
so each exit tried has a real price), and the later batched catch-up of the layers it skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from edgekit.evaluate import log_softmax

OFF = 2.0  # a threshold no probability reaches: that exit is never taken (nor its head paid for)
GRID = (0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)


@dataclass
class ExitStats:
    """Per scored position and depth: top-token probability and NLL of the true next token."""

    depths: list[int]
    confidence: np.ndarray  # [positions, depths]
    nll: np.ndarray  # [positions, depths]

    def exit_index(self, thresholds: Sequence[float]) -> np.ndarray:
        """Per position, the index (into ``depths``) of the depth dynamic inference exits at."""
        limits = _expand(thresholds, len(self.depths))
        chosen = np.full(self.confidence.shape[0], len(self.depths) - 1, dtype=np.int64)
        undecided = np.ones(self.confidence.shape[0], dtype=bool)
        for index, limit in enumerate(limits[:-1]):
            if limit > 1.0:
                continue
            exits = undecided & (self.confidence[:, index] >= limit)
            chosen[exits] = index
            undecided &= ~exits
        return chosen

    def perplexity(self, thresholds: Sequence[float] | None = None, depth: int | None = None) -> float:
        """Perplexity of the dynamic model (``thresholds``) or of the fixed sub-model ``depth``."""
        if thresholds is None:
            column = self.depths.index(depth if depth is not None else self.depths[-1])
            return float(np.exp(self.nll[:, column].mean()))
        index = self.exit_index(thresholds)
        return float(np.exp(self.nll[np.arange(index.size), index].mean()))

    def mean_exit_depth(self, thresholds: Sequence[float]) -> float:
        return float(np.asarray(self.depths)[self.exit_index(thresholds)].mean())


def _expand(thresholds: Sequence[float], count: int) -> list[float]:
    limits = [float(t) for t in thresholds]
    return limits * count if len(limits) == 1 else limits


def exit_statistics(
    logits_fn: Callable[[np.ndarray], dict[int, np.ndarray]],
    tokens: np.ndarray,
    window: int = 256,
    stride: int = 128,
) -> ExitStats:
    """One sliding-window pass keeping every depth's confidence and NLL per scored position.

    ``logits_fn(ids[1, L]) -> {depth: logits[1, L, V]}`` (numpy arrays or torch tensors); the
    windows and scored positions are those of :func:`edgekit.evaluate.perplexity`.
    """
    if stride <= 0 or stride > window:
        raise ValueError("need 0 < stride <= window")
    ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
    confidence: list[np.ndarray] = []
    nll: list[np.ndarray] = []
    depths: list[int] = []
    previous_end = 0
    for start in range(0, ids.size - 1, stride):
        end = min(start + window, ids.size)
        chunk = ids[start:end]
        first_new = max(previous_end - start, 1)
        rows = np.arange(first_new - 1, chunk.size - 1)
        targets = chunk[first_new:]
        per_depth = logits_fn(chunk[None, :])
        depths = sorted(per_depth)
        block_confidence, block_nll = [], []
        for depth in depths:
            top, target_nll = _scored(per_depth[depth], rows, targets)
            block_confidence.append(top)
            block_nll.append(target_nll)
        confidence.append(np.stack(block_confidence, axis=1))
        nll.append(np.stack(block_nll, axis=1))
        previous_end = end
        if end == ids.size:
            break
    return ExitStats(depths, np.concatenate(confidence), np.concatenate(nll))


def _scored(logits, rows: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-token probability and the target's NLL at ``rows`` of ``logits[1, L, V]``.

    Torch logits are scored where they are (on a GPU, the vocabulary-wide softmax of every depth
    would otherwise cross to the host); numpy logits (the runtime's) with numpy.
    """
    if isinstance(logits, np.ndarray):
        scores = log_softmax(logits[0, rows])
        return np.exp(scores.max(axis=-1)), -scores[np.arange(rows.size), targets]
    import torch

    index = torch.as_tensor(rows, device=logits.device)
    scores = torch.log_softmax(logits[0, index].float(), dim=-1)
    target_scores = scores.gather(1, torch.as_tensor(targets, device=logits.device)[:, None])[:, 0]
    return scores.amax(dim=-1).exp().cpu().numpy(), (-target_scores).cpu().numpy()


@dataclass
class DecodeCost:
    """Measured one-token decode cost of each segment and of the head, in ms.

    ``catch_up``: the extra time of one more position in a segment call, as a fraction of a
    one-position call (what recomputing an exited token's skipped layers costs when they run
    batched with the next token that goes deeper).
    """

    segment_ms: list[float]
    head_ms: float
    catch_up: float

    def per_token_ms(self, stats: ExitStats, thresholds: Sequence[float]) -> float:
        """Predicted mean decode time per token of a threshold setting on ``stats``' text."""
        limits = _expand(thresholds, len(self.segment_ms))
        segments = np.asarray(self.segment_ms)
        run = np.cumsum(segments)  # segments 0..i
        skipped = segments.sum() - run  # segments after i, recomputed later in a batched chunk
        heads = np.cumsum([1.0 if limit <= 1.0 else 0.0 for limit in limits[:-1]] + [1.0])
        index = stats.exit_index(limits)
        cost = run[index] + self.head_ms * heads[index] + self.catch_up * skipped[index]
        return float(cost.mean())

    def full_ms(self) -> float:
        return float(sum(self.segment_ms) + self.head_ms)


def threshold_curve(
    stats: ExitStats, cost: DecodeCost, grid: Sequence[float] = GRID, max_ratio: float = 1.5
) -> list[dict]:
    """The greedy walk from the full model to cheaper settings (see the module notes).

    Each point: thresholds, perplexity and ratio to the full model on ``stats``' text, predicted
    ms/token and tokens/s speed-up, mean exit depth. Stops when no move saves time or the next
    point would pass ``max_ratio``.
    """
    exits = len(stats.depths) - 1
    current = [OFF] * exits + [0.0]
    full_ppl = stats.perplexity()
    full_ms = cost.full_ms()

    def point(limits: list[float]) -> dict:
        ppl = stats.perplexity(limits)
        ms = cost.per_token_ms(stats, limits)
        return {
            "thresholds": list(limits),
            "perplexity": ppl,
            "perplexity_ratio": ppl / full_ppl,
            "predicted_ms_per_token": ms,
            "predicted_speedup": full_ms / ms,
            "mean_exit_depth": stats.mean_exit_depth(limits),
        }

    curve = [point(current)]
    while True:
        here = curve[-1]
        best, best_score = None, -np.inf
        for index in range(exits):
            for value in grid:
                if value >= current[index]:
                    continue  # only ever lower a threshold: exit more often
                candidate = [*current[:index], value, *current[index + 1 :]]
                moved = point(candidate)
                saved = here["predicted_ms_per_token"] - moved["predicted_ms_per_token"]
                if saved <= 0 or moved["perplexity_ratio"] > max_ratio:
                    continue
                added = max(np.log(moved["perplexity"]) - np.log(here["perplexity"]), 1e-9)
                if saved / added > best_score:
                    best, best_score = moved, saved / added
        if best is None:
            return curve
        current = best["thresholds"]
        curve.append(best)


def calibrated(curve: list[dict], max_ratio: float = 1.05) -> dict:
    """The fastest curve point within ``max_ratio`` × the full model's perplexity (the full model if none)."""
    within = [p for p in curve if p["perplexity_ratio"] <= max_ratio]
    return min(within, key=lambda p: p["predicted_ms_per_token"])
