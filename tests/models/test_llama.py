"""CausalLMWithCache against transformers' own LLaMA forward on a tiny random model."""

from __future__ import annotations

import pytest
import torch
from tiny_llama import perturb_norms, tiny_llama_config
from transformers import LlamaForCausalLM

from edgekit.errors import EdgekitError
from edgekit.models.llama import CausalLMWithCache, DecodeGraph, PrefillGraph


def tiny_llama(layers: int = 3, kv_heads: int = 2, rope: dict | None = None) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = tiny_llama_config(
        101,
        layers=layers,
        hidden=48,
        heads=6,
        num_key_value_heads=kv_heads,
        rope_parameters=rope or {"rope_type": "default", "rope_theta": 5000.0},
        tie_word_embeddings=False,
    )
    return perturb_norms(LlamaForCausalLM(config).eval())


@pytest.fixture(scope="module")
def hf() -> LlamaForCausalLM:
    return tiny_llama()


def ids(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 101, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kv_heads", [2, 6])
def test_logits_match_transformers(kv_heads: int) -> None:
    hf = tiny_llama(kv_heads=kv_heads)
    tokens = ids(19)
    with torch.no_grad():
        expected = hf(tokens).logits
        got = CausalLMWithCache(hf)(tokens)
    assert got.shape == (1, 19, 101)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_scaled_rope_matches_transformers() -> None:
    hf = tiny_llama(rope={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})
    tokens = ids(23)
    with torch.no_grad():
        torch.testing.assert_close(CausalLMWithCache(hf)(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)


def test_prefill_returns_post_rope_cache_like_transformers(hf: LlamaForCausalLM) -> None:
    tokens = ids(11)
    model = CausalLMWithCache(hf)
    with torch.no_grad():
        logits, *cache = model.prefill(tokens)
        reference = hf(tokens, use_cache=True)
    assert len(cache) == 2 * 3
    for layer in range(3):
        torch.testing.assert_close(cache[2 * layer], reference.cache.layers[layer].keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache[2 * layer + 1], reference.cache.layers[layer].values, atol=1e-5, rtol=1e-5)
    assert cache[0].shape == (1, 2, 11, 8)
    torch.testing.assert_close(logits, reference.logits, atol=1e-4, rtol=1e-4)


def test_decode_token_by_token_equals_full_sequence(hf: LlamaForCausalLM) -> None:
    tokens = ids(14, seed=3)
    model = CausalLMWithCache(hf)
    with torch.no_grad():
        full = model(tokens)
        logits, *cache = model.prefill(tokens[:, :5])
        steps = [logits]
        for position in range(5, 14):
            logits, *cache = model.decode(tokens[:, position : position + 1], *cache)
            steps.append(logits)
    assert cache[0].shape[2] == 14
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)


def test_decode_of_a_chunk_is_causal(hf: LlamaForCausalLM) -> None:
    tokens = ids(12, seed=4)
    model = CausalLMWithCache(hf)
    with torch.no_grad():
        full = model(tokens)
        _, *cache = model.prefill(tokens[:, :7])
        chunk, *cache = model.decode(tokens[:, 7:], *cache)
    torch.testing.assert_close(chunk, full[:, 7:], atol=1e-4, rtol=1e-4)
    assert cache[0].shape[2] == 12


@pytest.mark.parametrize("n", [1, 2])
def test_truncated_model_equals_transformers_cut_at_layer(hf: LlamaForCausalLM, n: int) -> None:
    tokens = ids(9)
    with torch.no_grad():
        hidden = hf(tokens, output_hidden_states=True).hidden_states[n]
        expected = hf.lm_head(hf.model.norm(hidden))
        model = CausalLMWithCache(hf, num_layers=n)
        got = model(tokens)
        logits, *cache = model.prefill(tokens)
    assert model.num_layers == n and len(cache) == 2 * n
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, hf(tokens).logits, atol=1e-3)


def test_shares_weights_with_the_transformers_model(hf: LlamaForCausalLM) -> None:
    model = CausalLMWithCache(hf)
    assert model.layers[0].self_attn.q_proj is hf.model.layers[0].self_attn.q_proj
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in hf.parameters())


def test_bad_layer_count_is_a_user_error(hf: LlamaForCausalLM) -> None:
    with pytest.raises(EdgekitError, match="between 1 and 3"):
        CausalLMWithCache(hf, num_layers=4)


def test_torch_export_with_dynamic_lengths(hf: LlamaForCausalLM) -> None:
    model = CausalLMWithCache(hf).eval()
    prefill_graph, decode_graph = PrefillGraph(model), DecodeGraph(model)
    prefill = torch.export.export(
        prefill_graph, prefill_graph.example_inputs(8), dynamic_shapes=prefill_graph.dynamic_shapes(128)
    )
    decode = torch.export.export(
        decode_graph, decode_graph.example_inputs(6), dynamic_shapes=decode_graph.dynamic_shapes(128)
    )
    assert len(decode_graph.input_names) == 1 + 6 and len(decode_graph.output_names) == 1 + 6
    tokens = ids(13, seed=5)
    with torch.no_grad():
        logits, *cache = prefill.module()(tokens[:, :12])
        step, *_ = decode.module()(tokens[:, 12:], *cache)
        reference = model(tokens)
    torch.testing.assert_close(logits, reference[:, :12], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step, reference[:, 12:], atol=1e-4, rtol=1e-4)
    ops = {str(node.target) for node in prefill.graph.nodes if node.op == "call_function"}
    assert not any("index.Tensor" in op for op in ops), ops
