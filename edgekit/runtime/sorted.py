"""Running a sorted (many-depth) LM bundle: a fixed depth, a latency budget, or per-token exits.

The bundle is cut into *segments* at the sub-model depths (layers 0..d1, d1..d2, ...; the first
segment also embeds the tokens) plus one *head* graph (final norm + LM head). Sub-model f_d is
the segments up to d, then the head. Every weight lives in exactly one graph, so a bundle with
all depths costs what one full-depth bundle costs, on disk and in memory.

Each segment graph takes a chunk of new positions (hidden states, or token ids for the first)
and that segment's past keys/values, and returns the chunk's hidden states and the grown
keys/values. The same graph serves prefill (empty past), one-token decode and the catch-up
chunks of dynamic inference.

Dynamic inference and the KV cache. A token that exits at depth d has no keys/values in the
layers past d, and a later token that goes deeper attends to them. We *recompute exactly*
rather than propagate the exit state (copying the exited hidden state up, CALM-style, which
changes what the deeper layers see): each segment keeps the hidden states of the tokens that
reached its input but stopped before it. When a token next continues into that segment, the
pending states and the new one run through it as one chunk (one graph call, so the catch-up is
batched with the token that needs it). Layers a token skipped are thus computed later from its
true hidden state, and the cache always equals what the full model would hold; the only effect of
an early exit is the token it chose. Output with thresholds 0 equals the shallowest sub-model's,
and with thresholds above 1 the full model's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.runtime.backends import OnnxBackend


@dataclass
class Segment:
    """Layers ``start`` up to (not including) ``end`` in graph ``graph``."""

    graph: str
    start: int
    end: int

    @property
    def layers(self) -> range:
        return range(self.start, self.end)


@dataclass
class Generation:
    """Tokens generated, the depth each came from, and the wall time of the whole call."""

    tokens: list[int]
    depths: list[int]
    seconds: float
    depth_mode: str
    thresholds: list[float] | None = None

    @property
    def mean_depth(self) -> float:
        return float(np.mean(self.depths)) if self.depths else 0.0


@dataclass
class State:
    """Per-sequence decoding state: each layer's keys/values and each segment's pending inputs."""

    cache: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    pending: dict[int, list[np.ndarray]] = field(default_factory=dict)  # segment index -> [1, k, d] blocks


def softmax_confidence(logits: np.ndarray) -> float:
    """Probability of the top token (float64, so a threshold near 1 is compared exactly)."""
    row = np.asarray(logits, dtype=np.float64).reshape(-1)
    shifted = row - row.max()
    return float(1.0 / np.exp(shifted).sum())


class SortedModel:
    """A sorted bundle's segments and head, as onnxruntime sessions, with the three depth policies."""

    def __init__(
        self, directory: Path, info: dict[str, Any], files: dict[str, str], threads: int | None = None
    ) -> None:
        self.directory = Path(directory)
        self.info = info
        self.depths: list[int] = [int(depth) for depth in info["depths"]]
        self.segments = [Segment(s["graph"], int(s["start"]), int(s["end"])) for s in info["segments"]]
        self.head_graph: str = info["head"]
        self.num_kv_heads = int(info["num_kv_heads"])
        self.head_dim = int(info["head_dim"])
        self.thresholds: list[float] = [float(t) for t in info.get("thresholds", [])] or [1.0] * len(self.depths)
        self.files = files
        self.threads = threads
        self._backends: dict[str, OnnxBackend] = {}
        if [segment.end for segment in self.segments] != self.depths:
            raise EdgekitError("malformed sorted manifest: segment ends do not match the depths")

    @classmethod
    def from_session(cls, session) -> SortedModel:
        """The sorted view of a loaded :class:`~edgekit.runtime.session.Session`."""
        spec = session.manifest.formats.get("onnx")
        info = spec.details.get("sorted") if spec is not None else None
        if not info:
            raise EdgekitError(f"{session.directory} is not a sorted (many-depth) bundle")
        files = {name: graph.file for name, graph in spec.graphs.items()}
        return cls(session.directory, info, files, session.threads)

    # -- graphs ----------------------------------------------------------------------------------
    def _backend(self, name: str) -> OnnxBackend:
        if name not in self._backends:
            self._backends[name] = OnnxBackend(self.directory / self.files[name], self.threads)
        return self._backends[name]

    def load_all(self) -> None:
        """Open every graph now (so timing excludes session creation)."""
        for name in [*(segment.graph for segment in self.segments), self.head_graph]:
            self._backend(name)

    def check_depth(self, depth: int) -> int:
        if depth not in self.depths:
            raise EdgekitError(f"depth {depth} is not in this bundle (it has: {', '.join(map(str, self.depths))})")
        return depth

    def _empty(self) -> np.ndarray:
        return np.zeros((1, self.num_kv_heads, 0, self.head_dim), dtype=np.float32)

    def _run_segment(self, index: int, chunk: np.ndarray, state: State) -> np.ndarray:
        """Run segment ``index`` on ``chunk`` (ids [1, k] or hidden [1, k, d]); grow its cache."""
        segment = self.segments[index]
        feeds: dict[str, np.ndarray] = {"input_ids" if index == 0 else "hidden": chunk}
        for layer in segment.layers:
            key, value = state.cache.get(layer, (self._empty(), self._empty()))
            feeds[f"past.{layer}.key"], feeds[f"past.{layer}.value"] = key, value
        outputs = self._backend(segment.graph).run(feeds)
        for layer in segment.layers:
            state.cache[layer] = (outputs[f"present.{layer}.key"], outputs[f"present.{layer}.value"])
        return outputs["hidden_out"]

    def head(self, hidden: np.ndarray) -> np.ndarray:
        """Logits [1, k, V] of hidden states [1, k, d] (the shared final norm and LM head)."""
        return self._backend(self.head_graph).run({"hidden": np.ascontiguousarray(hidden, dtype=np.float32)})["logits"]

    # -- fixed depth -----------------------------------------------------------------------------
    def _segments_to(self, depth: int) -> int:
        return self.depths.index(self.check_depth(depth)) + 1

    def hidden(self, input_ids: np.ndarray, depth: int, state: State | None = None) -> np.ndarray:
        """Hidden states after ``depth`` layers for new tokens ``input_ids`` [1, k] (cache in ``state``)."""
        state = state if state is not None else State()
        hidden = np.asarray(input_ids, dtype=np.int64)
        for index in range(self._segments_to(depth)):
            hidden = self._run_segment(index, hidden, state)
        return hidden

    def logits(self, input_ids: np.ndarray, depth: int | None = None) -> np.ndarray:
        """Logits [1, S, V] of sub-model f_depth (default: the full model) for a whole sequence."""
        return self.head(self.hidden(input_ids, depth or self.depths[-1]))

    def all_exit_logits(self, input_ids: np.ndarray) -> dict[int, np.ndarray]:
        """Logits [1, S, V] at every depth from one pass (what dynamic inference chooses among)."""
        state, hidden, result = State(), np.asarray(input_ids, dtype=np.int64), {}
        for index, depth in enumerate(self.depths):
            hidden = self._run_segment(index, hidden, state)
            result[depth] = self.head(hidden)
        return result

    # -- depth policies --------------------------------------------------------------------------
    def depth_for_budget(self, budget_ms: float) -> int:
        """The deepest sub-model whose measured per-token decode latency is within ``budget_ms``."""
        measured = {int(row["depth"]): float(row["decode_ms_per_token"]) for row in self.info.get("latency", [])}
        if not measured:
            raise EdgekitError("this bundle records no per-depth latency; pass a fixed --depth")
        fitting = [depth for depth in self.depths if depth in measured and measured[depth] <= budget_ms]
        if not fitting:
            fastest = min(measured.values())
            raise EdgekitError(
                f"no depth decodes within {budget_ms:g} ms per token (the fastest takes {fastest:.1f} ms)"
            )
        return max(fitting)

    def resolve_depth(self, depth: int | str | None, budget_ms: float | None) -> int | str:
        """An int depth, or ``"dynamic"``; ``"auto"`` (and any ``budget_ms``) picks by latency."""
        if budget_ms is not None and depth not in (None, "auto"):
            raise EdgekitError("--budget-ms chooses the depth itself; use it with --depth auto (or alone)")
        if depth == "auto" or budget_ms is not None:
            if budget_ms is None:
                raise EdgekitError("--depth auto needs a latency budget (--budget-ms)")
            return self.depth_for_budget(budget_ms)
        if depth is None:
            return self.depths[-1]
        if depth == "dynamic":
            return "dynamic"
        try:
            return self.check_depth(int(depth))
        except ValueError:
            raise EdgekitError(f"--depth takes a number, 'auto' or 'dynamic', got '{depth}'") from None

    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int = 32,
        *,
        depth: int | str | None = None,
        budget_ms: float | None = None,
        thresholds: list[float] | None = None,
        eos_ids: set[int] | frozenset[int] = frozenset(),
    ) -> Generation:
        """Greedy decoding at a fixed depth, the depth a latency budget allows, or per-token exits."""
        if not prompt_ids:
            raise EdgekitError("empty prompt")
        chosen = self.resolve_depth(depth, budget_ms)
        started = time.perf_counter()
        if chosen == "dynamic":
            limits = self._thresholds(thresholds)
            tokens, depths = self._generate_dynamic(prompt_ids, max_new_tokens, limits, eos_ids)
            return Generation(tokens, depths, time.perf_counter() - started, "dynamic", limits)
        state, tokens = State(), []
        hidden = self.hidden(np.asarray([prompt_ids], dtype=np.int64), int(chosen), state)
        for _ in range(max_new_tokens):
            token = int(np.argmax(self.head(hidden[:, -1:])[0, -1]))
            tokens.append(token)
            if token in eos_ids:
                break
            hidden = self.hidden(np.asarray([[token]], dtype=np.int64), int(chosen), state)
        return Generation(tokens, [int(chosen)] * len(tokens), time.perf_counter() - started, f"fixed:{chosen}")

    def _thresholds(self, thresholds: list[float] | None) -> list[float]:
        limits = [float(t) for t in (thresholds if thresholds is not None else self.thresholds)]
        if len(limits) == 1:
            limits = limits * len(self.depths)
        if len(limits) != len(self.depths):
            raise EdgekitError(f"give one threshold or one per depth ({len(self.depths)}), got {len(limits)}")
        return limits

    def _step_dynamic(self, chunk: np.ndarray, state: State, limits: list[float]) -> tuple[np.ndarray, int]:
        """Run new positions ``chunk`` until an exit is confident; returns (last logits, exit depth).

        Segment ``i``'s input is its pending states (tokens that stopped before it) followed by
        this chunk's; the output of a segment where we stop becomes the next segment's pending.
        The last depth always accepts. A threshold above 1 skips that exit without paying for its
        head (no probability can reach it).
        """
        hidden = chunk
        last = len(self.segments) - 1
        for index in range(len(self.segments)):
            blocks = state.pending.pop(index, [])
            inputs = hidden if not blocks else np.concatenate([*blocks, hidden], axis=1)
            hidden = self._run_segment(index, inputs, state)
            if index == last:
                return self.head(hidden[:, -1:])[0, -1], self.depths[index]
            if limits[index] <= 1.0:
                logits = self.head(hidden[:, -1:])[0, -1]
                if softmax_confidence(logits) >= limits[index]:
                    state.pending.setdefault(index + 1, []).append(hidden)
                    return logits, self.depths[index]
        raise AssertionError("unreachable: the last segment always returns")

    def _generate_dynamic(
        self, prompt_ids: list[int], max_new_tokens: int, limits: list[float], eos_ids: set[int] | frozenset[int]
    ) -> tuple[list[int], list[int]]:
        state = State()
        chunk = np.asarray([prompt_ids], dtype=np.int64)
        tokens, depths = [], []
        for _ in range(max_new_tokens):
            logits, depth = self._step_dynamic(chunk, state, limits)
            token = int(np.argmax(logits))
            tokens.append(token)
            depths.append(depth)
            if token in eos_ids:
                break
            chunk = np.asarray([[token]], dtype=np.int64)
        self._last_state = state  # kept for inspection (tests check the cache against a full pass)
        return tokens, depths

    def flush(self, state: State) -> None:
        """Run every pending state through the rest of the network (completes the cache)."""
        for index in range(1, len(self.segments)):
            blocks = state.pending.pop(index, [])
            if blocks:
                hidden = self._run_segment(index, np.concatenate(blocks, axis=1), state)
                if index + 1 < len(self.segments):
                    state.pending.setdefault(index + 1, []).append(hidden)


def dynamic_exit_depths(exit_logits: dict[int, np.ndarray], thresholds: list[float]) -> np.ndarray:
    """Per position, the depth per-token dynamic inference exits at, from every depth's logits.

    With the exact cache (see the module notes) each depth's hidden state for a position is the
    full model's, so the choice at a position depends only on that position's logits at each
    depth: this gives the dynamic model's predictions for a whole sequence from one pass.
    """
    depths = sorted(exit_logits)
    thresholds = list(thresholds) * len(depths) if len(thresholds) == 1 else list(thresholds)
    positions = next(iter(exit_logits.values())).shape[-2]
    chosen = np.full(positions, depths[-1], dtype=np.int64)
    undecided = np.ones(positions, dtype=bool)
    for depth, limit in zip(depths[:-1], thresholds[:-1], strict=True):
        if limit > 1.0:
            continue
        logits = np.asarray(exit_logits[depth], dtype=np.float64).reshape(positions, -1)
        shifted = logits - logits.max(axis=-1, keepdims=True)
        confidence = 1.0 / np.exp(shifted).sum(axis=-1)
        exits = undecided & (confidence >= limit)
        chosen[exits] = depth
        undecided &= ~exits
    return chosen
