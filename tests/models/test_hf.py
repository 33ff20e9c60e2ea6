"""Local Hugging Face directories: the three families on tiny saved models, and broken dirs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    Dinov2Config,
    Dinov2Model,
    DistilBertConfig,
    DistilBertModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from edgekit.errors import EdgekitError
from edgekit.models import sources
from edgekit.models.hf import SentenceEncoder, VisionEncoder, load_directory
from edgekit.models.llama import CausalLMWithCache
from edgekit.models.minilm import model_dir as minilm_dir

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def save(model: torch.nn.Module, path: Path) -> Path:
    model.save_pretrained(path)
    return path


def copy_tokenizer(path: Path) -> None:
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm_dir() / name, path / name)


@pytest.mark.parametrize(
    "factory",
    [
        lambda: LlamaForCausalLM(LlamaConfig(vocab_size=64, num_key_value_heads=2, **SMALL)),
        lambda: MistralForCausalLM(MistralConfig(vocab_size=64, num_key_value_heads=2, sliding_window=None, **SMALL)),
        lambda: Qwen2ForCausalLM(Qwen2Config(vocab_size=64, num_key_value_heads=2, **SMALL)),
    ],
    ids=["llama", "mistral", "qwen2"],
)
def test_causal_lm_directory_matches_transformers(tmp_path: Path, factory) -> None:
    torch.manual_seed(0)
    reference = factory().eval()
    bundle = load_directory(save(reference, tmp_path))
    assert bundle.task == "causal-lm" and isinstance(bundle.module, CausalLMWithCache)
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(bundle.module(ids), reference(ids).logits, atol=1e-4, rtol=1e-4)
    assert bundle.module(**bundle.example_inputs).shape[-1] == 64
    assert bundle.preprocess([1, 2, 3])["input_ids"].shape == (1, 3)
    with pytest.raises(EdgekitError, match="token ids"):
        bundle.preprocess([1, 99])


@pytest.mark.parametrize(
    "factory",
    [
        lambda: BertModel(BertConfig(vocab_size=30522, **SMALL)),
        lambda: DistilBertModel(DistilBertConfig(vocab_size=30522, dim=32, hidden_dim=64, n_layers=2, n_heads=4)),
    ],
    ids=["bert", "distilbert"],
)
def test_text_encoder_directory_is_a_masked_mean_pool(tmp_path: Path, factory) -> None:
    torch.manual_seed(0)
    reference = factory().eval()
    save(reference, tmp_path)
    copy_tokenizer(tmp_path)
    bundle = load_directory(tmp_path, max_tokens=16)
    assert bundle.task == "text-encoder" and isinstance(bundle.module, SentenceEncoder)
    batch = bundle.tokenizer(
        ["a short one", "a noticeably longer sentence with more words"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        weights = batch.attention_mask[..., None].float()
        expected = torch.nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)
        got = bundle.module(batch.input_ids, batch.attention_mask)
        alone = bundle.module(**bundle.preprocess("a short one"))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone[0], got[0], atol=1e-5, rtol=1e-5)  # padding does not leak in
    assert bundle.preprocess("word " * 100)["input_ids"].shape == (1, 16)


def test_dinov2_directory_returns_last_hidden_state(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = Dinov2Config(image_size=28, patch_size=14, **SMALL)
    reference = Dinov2Model(config).eval()
    bundle = load_directory(save(reference, tmp_path))
    assert bundle.task == "vision-encoder" and isinstance(bundle.module, VisionEncoder)
    pixels = bundle.example_inputs["pixel_values"]
    assert pixels.shape == (1, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(
            bundle.module(pixels), reference(pixel_values=pixels).last_hidden_state, atol=1e-5, rtol=1e-5
        )
        attentions = bundle.module.attentions(pixels)
    assert len(attentions) == 2 and attentions[0].shape == (1, 4, 5, 5)


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(EdgekitError, match="no config.json"):
        load_directory(tmp_path)
    with pytest.raises(EdgekitError, match="no config.json"):
        sources.load(str(tmp_path))  # the spec resolver routes directories here


def test_unsupported_architecture_names_it_and_the_supported_ones(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(EdgekitError, match=r"architecture GPT2LMHeadModel is not supported \(supported: Llama"):
        load_directory(tmp_path)


def test_broken_config_missing_and_corrupt_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(EdgekitError, match="not readable JSON"):
        load_directory(tmp_path)
    LlamaConfig(vocab_size=64, architectures=["LlamaForCausalLM"], **SMALL).save_pretrained(tmp_path)
    with pytest.raises(EdgekitError, match="no weights"):
        load_directory(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(EdgekitError, match="cannot load weights"):
        load_directory(tmp_path)


def test_sliding_window_models_are_refused(tmp_path: Path) -> None:
    config = MistralConfig(vocab_size=64, sliding_window=8, max_position_embeddings=64, **SMALL)
    save(MistralForCausalLM(config), tmp_path)
    with pytest.raises(EdgekitError, match="sliding-window"):
        load_directory(tmp_path)
