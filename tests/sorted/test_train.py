"""Sub-model truncation, the averaged sorted loss and the trainer's checkpoint/resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from edgekit.errors import EdgekitError
from edgekit.models.llama import CausalLMWithCache
from edgekit.sorted.data import IGNORE, alpaca_batches, read_alpaca
from edgekit.sorted.model import default_depths, exit_logits, sorted_loss, truncated
from edgekit.sorted.train import TrainConfig, learning_rate, train
from tests.sorted.tiny import VOCAB, tiny_llama, token_ids


def test_default_depths_match_the_paper_spacing() -> None:
    assert default_depths(30) == [12, 15, 18, 21, 24, 27, 30]
    assert default_depths(6) == [2, 3, 4, 5, 6]


def test_truncated_sub_model_is_the_full_model_cut_at_that_layer() -> None:
    hf = tiny_llama()
    tokens = token_ids(11)
    with torch.no_grad():
        # the full model's own hidden states (transformers), cut after 3 layers, then norm + head
        states = hf(tokens, output_hidden_states=True).hidden_states
        expected = hf.lm_head(hf.model.norm(states[3]))
        got = truncated(CausalLMWithCache(hf), 3)(tokens)
        exits = exit_logits(CausalLMWithCache(hf), tokens, [3, 6])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(exits[3], expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(exits[6], hf(tokens).logits, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(exits[3], exits[6], atol=1e-3)


def test_averaged_loss_reaches_every_layer() -> None:
    hf = tiny_llama()
    model = CausalLMWithCache(hf)
    tokens = token_ids(16, batch=2)
    loss, per_depth = sorted_loss(model, tokens, tokens, [2, 4, 6])
    loss.backward()
    assert loss.item() == pytest.approx(sum(per_depth.values()) / 3, rel=1e-5)
    for index, layer in enumerate(hf.model.layers):
        for name, param in layer.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, f"layer {index} {name} got no gradient"
    assert hf.model.embed_tokens.weight.grad.abs().sum() > 0


def test_shallow_loss_alone_leaves_deeper_layers_untouched() -> None:
    # control for the test above: a single shallow depth must not reach layers past it
    hf = tiny_llama()
    tokens = token_ids(16, batch=2)
    loss, _ = sorted_loss(CausalLMWithCache(hf), tokens, tokens, [2])
    loss.backward()
    assert all(p.grad is None for p in hf.model.layers[3].parameters())


def test_masked_labels_carry_no_loss() -> None:
    hf = tiny_llama()
    model = CausalLMWithCache(hf)
    tokens = token_ids(12)
    labels = tokens.clone()
    labels[:, :6] = IGNORE
    full, _ = sorted_loss(model, tokens, labels, [6])
    logits = hf(tokens).logits[0, 5:-1]
    expected = torch.nn.functional.cross_entropy(logits, tokens[0, 6:])
    torch.testing.assert_close(full, expected, atol=1e-5, rtol=1e-5)


def _batches(seed: int = 3):
    """Arithmetic progressions mod VOCAB with random starts and steps: learnable next tokens."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, VOCAB, (2, 1), generator=generator)
        steps = torch.randint(1, 4, (2, 1), generator=generator)
        ids = (starts + steps * torch.arange(16)) % VOCAB
        yield ids, ids.clone()


def test_training_lowers_every_depths_loss_and_resume_equals_one_run(tmp_path: Path) -> None:
    config = TrainConfig(depths=[2, 4, 6], steps=6, seq_len=16, batch=2, lr=3e-3, warmup=1, save_every=3)
    # one uninterrupted run
    straight = CausalLMWithCache(tiny_llama())
    result = train(straight, None, config, tmp_path / "a", data=_batches())
    first, last = result.history[0]["per_depth"], result.history[-1]["per_depth"]
    assert all(last[d] < first[d] for d in first), (first, last)

    # the same run interrupted during step 4 (after the step-3 checkpoint), then resumed
    def interrupted():
        for index, batch in enumerate(_batches()):
            if index == 3:
                raise KeyboardInterrupt
            yield batch

    with pytest.raises(KeyboardInterrupt):
        train(CausalLMWithCache(tiny_llama()), None, config, tmp_path / "b", data=interrupted())
    resumed = CausalLMWithCache(tiny_llama(seed=5))  # other initial weights: the checkpoint must win
    again = train(resumed, None, config, tmp_path / "b", data=_batches())
    assert [h["step"] for h in again.history] == list(range(1, 7))
    for a, b in zip(straight.hf_model.parameters(), resumed.hf_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    with pytest.raises(EdgekitError, match="other settings"):
        train(resumed, None, TrainConfig(**{**config.__dict__, "lr": 1e-3}), tmp_path / "b", data=_batches())


def test_learning_rate_warms_up_then_decays() -> None:
    config = TrainConfig(steps=10, warmup=2, lr=1.0, min_lr_ratio=0.1)
    rates = [learning_rate(config, step) for step in range(10)]
    assert rates[0] == 0.5 and rates[1] == 1.0
    assert all(a >= b for a, b in zip(rates[1:], rates[2:], strict=False))
    assert rates[-1] >= 0.1


class _CharTokenizer:
    """Characters as tokens: enough for checking the Alpaca masking without a real tokenizer."""

    eos_token_id = 1
    pad_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False):
        class Encoded:
            input_ids = [2 + (ord(c) % 90) for c in text]

        return Encoded()


def test_alpaca_loss_is_on_the_response_only(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"instruction": "Say hi", "input": "", "output": "hi"}) + "\n")
    ids, labels = next(alpaca_batches(read_alpaca(path), _CharTokenizer(), batch=1, seq_len=512, seed=0))
    kept = labels[labels != IGNORE].tolist()
    assert kept == [2 + ord("h") % 90, 2 + ord("i") % 90, 1]
    assert ids.shape == labels.shape


@pytest.mark.parametrize(
    "content, message",
    [("{not json\n", "not a JSON object"), (json.dumps({"instruction": "x"}) + "\n", "'output'"), ("\n", "no records")],
)
def test_bad_alpaca_files_are_user_errors(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(EdgekitError, match=message):
        read_alpaca(path)


@pytest.mark.parametrize(
    ("device", "message"),
    [("gpu0", "not a torch device"), ("meta", "runs on cpu or cuda")]
    + ([] if torch.cuda.is_available() else [("cuda", "no CUDA GPU")]),
)
def test_bad_device_is_a_user_error(device: str, message: str) -> None:
    with pytest.raises(EdgekitError, match=message):
        TrainConfig(device=device).check()


def test_moving_a_sub_model_moves_the_whole_wrapped_model() -> None:
    """Training moves the model to its device in one call; the layers a sub-model does not run and
    the transformers model's own buffers must follow, or a later deeper sub-model mixes devices."""
    hf_model = tiny_llama()
    CausalLMWithCache(hf_model, num_layers=2).double()
    assert {p.dtype for p in hf_model.parameters()} == {torch.float64}
    assert all(b.dtype == torch.float64 for b in hf_model.buffers() if b.is_floating_point())
