import numpy as np

from edgekit import evaluate


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    tokens = np.random.default_rng(0).integers(0, 7, 300)
    ppl = evaluate.perplexity(lambda ids: np.zeros((1, ids.shape[1], 7)), tokens, window=64, stride=32)
    assert abs(ppl - 7.0) < 1e-9


def test_perplexity_scores_every_token_once():
    tokens = np.arange(1, 101) % 5
    seen = []

    def logits_fn(ids):
        seen.append(ids.shape[1])
        logits = np.full((1, ids.shape[1], 5), -30.0)
        logits[0, np.arange(ids.shape[1]), (ids[0] + 1) % 5] = 30.0  # predicts the next token exactly
        return logits

    assert abs(evaluate.perplexity(logits_fn, tokens, window=32, stride=16) - 1.0) < 1e-6
    assert seen[0] == 32


def test_perplexity_feeds_full_windows_only_and_scores_each_token_once():
    tokens = np.arange(1, 101) % 5
    tokens[[10, 40, 77, 98]] = 0  # positions a next-token model gets wrong
    lengths = []

    def logits_fn(ids):  # context-free: the score of each token does not depend on the window
        lengths.append(ids.shape[1])
        logits = np.zeros((1, ids.shape[1], 5))
        logits[0, np.arange(ids.shape[1]), (ids[0] + 1) % 5] = 3.0
        return logits

    # 100 tokens in windows of 26, stride 13: the last window would be 22 tokens if not extended back
    windowed = evaluate.perplexity(logits_fn, tokens, window=26, stride=13)
    assert set(lengths) == {26}
    whole = evaluate.perplexity(logits_fn, tokens, window=100, stride=100)
    assert abs(windowed - whole) < 1e-9


def test_agreement_sqnr_cosine():
    a = np.array([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    assert evaluate.top1_agreement(a, a) == 1.0
    assert evaluate.top1_accuracy(a, [1, 0]) == 0.5
    assert evaluate.sqnr_db(a, a) == float("inf")
    assert 19.9 < evaluate.sqnr_db(np.ones(100), np.ones(100) * 1.1) < 20.1
    assert abs(evaluate.cosine(a, 2 * a) - 1.0) < 1e-12
