"""Dynamic-inference perplexity, its cost model, threshold calibration and its held-out text."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from edgekit.errors import EdgekitError
from edgekit.sorted.data import held_out_tokens, lm_batches, trained_positions, unseen_span, wikipedia_tokens
from edgekit.sorted.dynamic import OFF, DecodeCost, ExitStats, calibrated, exit_statistics, threshold_curve

DEPTHS = [2, 4, 6]


def stats_where_shallow_is_right_when_confident(positions: int = 400) -> ExitStats:
    """Depth 2 is confident (0.97) and as good as the full model on half the positions, unsure
    (0.4) and much worse on the rest; depth 4 is never confident and a little worse."""
    confident = np.arange(positions) % 2 == 0
    confidence = np.stack([np.where(confident, 0.97, 0.4), np.full(positions, 0.5), np.full(positions, 0.9)], axis=1)
    full = np.full(positions, 2.0)
    nll = np.stack([np.where(confident, 2.0, 6.0), full + 0.3, full], axis=1)
    return ExitStats(DEPTHS, confidence, nll)


def test_exit_rule_and_perplexity() -> None:
    stats = stats_where_shallow_is_right_when_confident()
    assert stats.perplexity() == pytest.approx(np.exp(2.0))
    assert stats.perplexity(depth=2) == pytest.approx(np.exp(4.0))
    assert stats.perplexity([OFF, OFF, 0.0]) == pytest.approx(np.exp(2.0))  # never exit: the full model
    assert stats.perplexity([0.0]) == pytest.approx(np.exp(4.0))  # always exit first: depth 2
    assert stats.perplexity([0.95, OFF, 0.0]) == pytest.approx(np.exp(2.0))  # exits only where right
    assert stats.mean_exit_depth([0.95, OFF, 0.0]) == pytest.approx(4.0)  # half at 2, half at 6


def test_cost_counts_segments_heads_and_catch_up() -> None:
    stats = stats_where_shallow_is_right_when_confident()
    cost = DecodeCost(segment_ms=[10.0, 10.0, 10.0], head_ms=5.0, catch_up=0.1)
    assert cost.per_token_ms(stats, [OFF, OFF, 0.0]) == pytest.approx(35.0) == cost.full_ms()
    # exit 2 enabled: exited tokens pay segment 0, one head, a tenth of segments 1-2 later;
    # the others pay all segments and two heads
    assert cost.per_token_ms(stats, [0.95, OFF, 0.0]) == pytest.approx(0.5 * (10 + 5 + 2) + 0.5 * (30 + 10))
    # an exit nobody takes only adds its head
    assert cost.per_token_ms(stats, [OFF, 0.99, 0.0]) == pytest.approx(40.0)


def test_calibration_takes_the_exit_that_is_free_in_perplexity() -> None:
    stats = stats_where_shallow_is_right_when_confident()
    curve = threshold_curve(stats, DecodeCost([10.0, 10.0, 10.0], 5.0, 0.1))
    assert curve[0]["thresholds"] == [OFF, OFF, 0.0] and curve[0]["perplexity_ratio"] == 1.0
    times = [point["predicted_ms_per_token"] for point in curve]
    assert times == sorted(times, reverse=True) and len(curve) > 1
    chosen = calibrated(curve, 1.05)
    assert chosen["perplexity_ratio"] <= 1.05 and 0.4 < chosen["thresholds"][0] <= 0.97
    assert chosen["predicted_speedup"] == pytest.approx(35.0 / 28.5)
    assert calibrated(curve, 1.0)["perplexity_ratio"] == 1.0


def test_calibration_keeps_the_full_model_when_exits_only_cost() -> None:
    stats = stats_where_shallow_is_right_when_confident()
    stats.confidence[:] = 0.1  # nobody is ever confident: every exit adds a head and saves nothing
    curve = threshold_curve(stats, DecodeCost([10.0, 10.0, 10.0], 5.0, 0.1))
    assert calibrated(curve)["thresholds"] == [OFF, OFF, 0.0]


def test_replayed_training_windows_match_the_batches_and_calibration_avoids_them() -> None:
    positions = np.arange(5000)  # a token stream whose ids are their positions
    stream = lm_batches(positions, batch=3, seq_len=40, seed=7)
    used = np.zeros(positions.size, dtype=bool)
    for _ in range(6):
        ids, _ = next(stream)
        used[ids.numpy().reshape(-1)] = True
    seen = trained_positions(positions.size, batch=3, seq_len=40, seed=7, draws=6)
    np.testing.assert_array_equal(seen, used)
    span = unseen_span(positions, seen, 300)
    assert span.size == 300 and not seen[span].any() and np.all(np.diff(span) == 1)
    with pytest.raises(EdgekitError, match="unseen"):
        unseen_span(positions, np.ones(positions.size, dtype=bool), 10)


def test_torch_logits_score_as_numpy_logits() -> None:
    """A GPU model's logits are scored as tensors where they are; the statistics must not change."""
    generator = np.random.default_rng(3)
    tokens = generator.integers(0, 50, size=300)
    tables = {depth: generator.normal(size=(300, 50)).astype(np.float32) for depth in DEPTHS}

    def numpy_logits(ids: np.ndarray) -> dict[int, np.ndarray]:
        return {depth: table[ids] for depth, table in tables.items()}

    def torch_logits(ids: np.ndarray) -> dict:
        return {depth: torch.from_numpy(value) for depth, value in numpy_logits(ids).items()}

    expected = exit_statistics(numpy_logits, tokens, window=64, stride=32)
    actual = exit_statistics(torch_logits, tokens, window=64, stride=32)
    np.testing.assert_allclose(actual.confidence, expected.confidence, rtol=1e-5)
    np.testing.assert_allclose(actual.nll, expected.nll, rtol=1e-5, atol=1e-6)


def test_held_out_tail_is_never_trained_on_and_is_the_calibration_text(monkeypatch) -> None:
    from edgekit.data import wikipedia
    from edgekit.sorted.export import calibration_text

    monkeypatch.setattr(wikipedia, "token_stream", lambda *args, **kwargs: np.arange(5000))
    training = wikipedia_tokens(None, holdout=600)
    tail = held_out_tokens(None, 600)
    np.testing.assert_array_equal(np.concatenate([training, tail]), np.arange(5000))
    bundle = SimpleNamespace(tokenizer=None, meta={})
    text = calibration_text(bundle, {"calibration_tokens": 256, "training": {"holdout_tokens": 600}})
    np.testing.assert_array_equal(text, np.arange(4400, 4656))
    with pytest.raises(EdgekitError, match="holdout_tokens"):
        wikipedia_tokens(None, holdout=5000)
