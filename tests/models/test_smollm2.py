"""zoo:smollm2-135m loads for real (from the cached fp32 conversion of its GGUF)."""

from __future__ import annotations

import pytest
import torch

from edgekit.cache import file_sha256, is_valid
from edgekit.models import smollm2
from edgekit.models.bundle import ModelBundle
from edgekit.models.llama import CausalLMWithCache

pytestmark = pytest.mark.slow


def test_bundle_describes_the_model(smollm2_bundle: ModelBundle) -> None:
    bundle = smollm2_bundle
    assert bundle.task == "causal-lm" and bundle.dataset == "wikipedia"
    assert isinstance(bundle.module, CausalLMWithCache)
    ids = bundle.example_inputs["input_ids"]
    assert ids.dtype == torch.long and ids.shape[0] == 1 and 12 <= ids.shape[1] <= 32
    assert bundle.dynamic_axes == {"input_ids": {1: "sequence"}}
    meta = bundle.meta
    assert (meta["num_layers"], meta["hidden_size"], meta["vocab_size"]) == (30, 576, 49152)
    assert (meta["num_heads"], meta["num_kv_heads"], meta["head_dim"]) == (9, 3, 64)
    assert meta["rope_theta"] == 100000.0 and meta["eos_token_ids"] == [2]
    assert bundle.module.hf_model.config.num_hidden_layers == 30


def test_source_hash_is_the_gguf_sha256(smollm2_bundle: ModelBundle) -> None:
    entry = smollm2.checkpoint_dir()
    assert is_valid(entry)
    assert smollm2_bundle.source_hash == file_sha256(smollm2.gguf_path())


def test_logits_equal_transformers(smollm2_bundle: ModelBundle) -> None:
    bundle = smollm2_bundle
    with torch.no_grad():
        ours = bundle.module(**bundle.example_inputs)
        reference = bundle.module.hf_model(**bundle.example_inputs).logits
    assert ours.shape == (1, bundle.example_inputs["input_ids"].shape[1], 49152)
    torch.testing.assert_close(ours, reference, atol=1e-3, rtol=1e-4)
    assert (ours.argmax(-1) == reference.argmax(-1)).all()


def test_knows_a_fact_and_decodes_like_the_full_forward(smollm2_bundle: ModelBundle) -> None:
    bundle = smollm2_bundle
    prompt = bundle.preprocess("The capital of France is")["input_ids"]
    with torch.no_grad():
        logits, *cache = bundle.module.prefill(prompt)
        tokens = [int(logits[0, -1].argmax())]
        for _ in range(3):
            logits, *cache = bundle.module.decode(torch.tensor([[tokens[-1]]]), *cache)
            tokens.append(int(logits[0, -1].argmax()))
        full = bundle.module(torch.cat([prompt, torch.tensor([tokens[:-1]])], dim=1))
    assert bundle.tokenizer.decode(tokens[:1]).strip() == "Paris"
    assert full[0, prompt.shape[1] - 1 :].argmax(-1).tolist() == tokens
    assert len(cache) == 60 and cache[0].shape == (1, 3, prompt.shape[1] + 3, 64)


def test_preprocess_truncates_long_text(smollm2_bundle: ModelBundle) -> None:
    ids = smollm2_bundle.preprocess("word " * 1000)["input_ids"]
    assert ids.shape == (1, smollm2.MAX_TOKENS)
