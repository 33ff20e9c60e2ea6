"""Training batches for sorted fine-tuning: Wikipedia language modelling or Alpaca instructions.

Both sources yield ``(input_ids [B, S], labels [B, S])`` where ``labels`` is ``-100`` at positions
that carry no loss. The order of batches depends only on the seed, so SoFT and the plain-SFT
baseline see exactly the same data.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from edgekit.errors import EdgekitError

IGNORE = -100
WIKIPEDIA = "wikipedia"
# The Stanford Alpaca prompt (with and without an input field); the loss is on the response only.
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def wikipedia_tokens(tokenizer, separator_id: int | None = None, holdout: int = 0) -> np.ndarray:
    """The training text: the Wikipedia excerpt's non-evaluation articles (its ``calib`` split).

    The held-out ``eval`` split, on which perplexity is reported, is never trained on. ``holdout``
    tokens at the end are kept out of training too (:func:`held_out_tokens`): a run of several
    epochs covers every window, so the training split has no unseen text left to calibrate on.
    """
    return _split_holdout(tokenizer, separator_id, holdout)[0]


def held_out_tokens(tokenizer, holdout: int, separator_id: int | None = None) -> np.ndarray:
    """The last ``holdout`` tokens of the training split, which :func:`wikipedia_tokens` leaves out."""
    return _split_holdout(tokenizer, separator_id, holdout)[1]


def _split_holdout(tokenizer, separator_id: int | None, holdout: int) -> tuple[np.ndarray, np.ndarray]:
    from edgekit.data.wikipedia import token_stream

    tokens = token_stream(tokenizer, "calib", None, separator_id)
    if not 0 <= holdout < tokens.size:
        raise EdgekitError(f"holdout_tokens must be in 0..{tokens.size - 1}, got {holdout}")
    return tokens[: tokens.size - holdout], tokens[tokens.size - holdout :]


def lm_batches(tokens: np.ndarray, batch: int, seq_len: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches of random ``seq_len`` windows of the token stream (every token has a loss)."""
    if tokens.size < seq_len + 1:
        raise EdgekitError(f"the training text has {tokens.size} tokens, fewer than seq_len={seq_len}")
    generator = np.random.default_rng(seed)
    stream = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    while True:
        starts = generator.integers(0, tokens.size - seq_len + 1, size=batch)
        ids = torch.stack([stream[start : start + seq_len] for start in starts])
        yield ids, ids.clone()


def read_alpaca(path: Path) -> list[dict[str, str]]:
    """Records of an Alpaca-format JSONL file (``instruction``, optional ``input``, ``output``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise EdgekitError(f"no such instruction data file: {path}")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise EdgekitError(f"{path}:{number}: not a JSON object") from None
        if not isinstance(record, dict) or not all(
            isinstance(record.get(key), str) for key in ("instruction", "output")
        ):
            raise EdgekitError(f"{path}:{number}: an Alpaca record needs string 'instruction' and 'output' fields")
        if not isinstance(record.get("input", ""), str):
            raise EdgekitError(f"{path}:{number}: 'input' must be a string")
        records.append(record)
    if not records:
        raise EdgekitError(f"{path} holds no records")
    return records


def encode_alpaca(record: dict[str, str], tokenizer, seq_len: int) -> tuple[list[int], list[int]]:
    """Token ids of prompt + response (+ EOS), and labels with the prompt masked out."""
    template = PROMPT_WITH_INPUT if record.get("input", "").strip() else PROMPT_NO_INPUT
    prompt = tokenizer(template.format(**{"input": "", **record}), add_special_tokens=False).input_ids
    response = tokenizer(record["output"], add_special_tokens=False).input_ids
    if tokenizer.eos_token_id is not None:
        response = [*response, int(tokenizer.eos_token_id)]
    ids = (prompt + response)[:seq_len]
    labels = ([IGNORE] * len(prompt) + response)[:seq_len]
    return ids, labels


def alpaca_batches(
    records: list[dict[str, str]], tokenizer, batch: int, seq_len: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches of random records, right-padded to the longest (padding has no loss).

    Right padding is exact for a causal model: no real position attends to a later pad token.
    """
    encoded = [encode_alpaca(record, tokenizer, seq_len) for record in records]
    if all(all(label == IGNORE for label in labels) for _, labels in encoded):
        raise EdgekitError(f"every response is cut off at seq_len={seq_len}; raise seq_len")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    generator = np.random.default_rng(seed)
    while True:
        chosen = [encoded[index] for index in generator.integers(0, len(encoded), size=batch)]
        width = max(len(ids) for ids, _ in chosen)
        ids = torch.full((batch, width), int(pad), dtype=torch.long)
        labels = torch.full((batch, width), IGNORE, dtype=torch.long)
        for row, (row_ids, row_labels) in enumerate(chosen):
            ids[row, : len(row_ids)] = torch.tensor(row_ids)
            labels[row, : len(row_labels)] = torch.tensor(row_labels)
        yield ids, labels


def batches(
    source: str,
    tokenizer,
    batch: int,
    seq_len: int,
    seed: int,
    separator_id: int | None = None,
    holdout: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``wikipedia`` (language modelling, minus ``holdout`` tail tokens) or an Alpaca-format JSONL path."""
    if source == WIKIPEDIA:
        return lm_batches(wikipedia_tokens(tokenizer, separator_id, holdout), batch, seq_len, seed)
    return alpaca_batches(read_alpaca(Path(source)), tokenizer, batch, seq_len, seed)


def trained_positions(size: int, batch: int, seq_len: int, seed: int, draws: int) -> np.ndarray:
    """Which positions of a ``size``-token stream :func:`lm_batches` put in its first ``draws`` batches.

    The windows depend only on the seed, so they can be replayed without the model.
    """
    seen = np.zeros(size, dtype=bool)
    generator = np.random.default_rng(seed)
    for _ in range(draws):
        for start in generator.integers(0, size - seq_len + 1, size=batch):
            seen[start : start + seq_len] = True
    return seen


def unseen_span(tokens: np.ndarray, seen: np.ndarray, length: int) -> np.ndarray:
    """The first ``length`` consecutive tokens that no training window covered.

    Calibration (e.g. of exit thresholds) then uses text of the training split's kind that the
    fine-tuning never saw, and never the evaluation split.
    """
    run = 0
    for position, covered in enumerate(seen):
        run = 0 if covered else run + 1
        if run == length:
            return np.asarray(tokens[position - length + 1 : position + 1])
    raise EdgekitError(f"no {length} consecutive tokens of the training text are unseen by the fine-tuning")
