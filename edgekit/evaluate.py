"""Quality measures shared by exports, reports and benchmarks.

NumPy only, so the torch-free runtime and the benchmarks score the exported file with the same
code that scores the torch model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def top1_accuracy(logits: np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Fraction of rows whose arg-max equals the label."""
    predictions = np.asarray(logits).reshape(len(labels), -1).argmax(axis=-1)
    return float(np.mean(predictions == np.asarray(labels)))


def top1_agreement(logits: np.ndarray, reference: np.ndarray) -> float:
    """Fraction of positions where both models pick the same top-1 class / next token."""
    a = np.asarray(logits)
    b = np.asarray(reference)
    return float(np.mean(a.argmax(axis=-1) == b.argmax(axis=-1)))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity of the last-axis vectors of ``a`` and ``b``."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, np.shape(a)[-1])
    b = np.asarray(b, dtype=np.float64).reshape(-1, np.shape(b)[-1])
    dots = (a * b).sum(-1)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return float(np.mean(dots / np.maximum(norms, 1e-12)))


def sqnr_db(signal: np.ndarray, approximation: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when identical)."""
    signal = np.asarray(signal, dtype=np.float64)
    noise = signal - np.asarray(approximation, dtype=np.float64)
    noise_power = float(np.mean(noise**2))
    if noise_power == 0.0:
        return float("inf")
    return float(10.0 * np.log10(max(float(np.mean(signal**2)), 1e-30) / noise_power))


def max_abs_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def perplexity(
    logits_fn: Callable[[np.ndarray], np.ndarray],
    tokens: Sequence[int] | np.ndarray,
    window: int = 256,
    stride: int = 128,
) -> float:
    """Sliding-window perplexity of a token stream.

    ``logits_fn(ids[1, L]) -> logits[1, L, V]``. Each window of ``window`` tokens starts ``stride``
    after the previous one; only tokens not scored by an earlier window count (the first window
    scores all but its first token), so every token after the first is scored exactly once with
    at least ``window - stride`` tokens of context (except at the start). Every window is full
    length (the last one ends at the stream's end and reaches back ``window`` tokens), so a
    static-shape program (an ExecuTorch .pte) can be scored like a dynamic one.
    """
    if stride <= 0 or stride > window:
        raise ValueError("need 0 < stride <= window")
    ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if ids.size < 2:
        raise ValueError("perplexity needs at least two tokens")
    total_nll, scored, previous_end = 0.0, 0, 0
    for start in range(0, ids.size - 1, stride):
        end = min(start + window, ids.size)
        start = max(end - window, 0)
        chunk = ids[start:end]
        logprobs = log_softmax(np.asarray(logits_fn(chunk[None, :]))[0])
        first_new = max(previous_end - start, 1)
        targets = chunk[first_new:]
        picked = logprobs[np.arange(first_new - 1, chunk.size - 1), targets]
        total_nll -= float(picked.sum())
        scored += targets.size
        previous_end = end
        if end == ids.size:
            break
    return float(np.exp(total_nll / scored))
