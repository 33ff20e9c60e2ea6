"""LoRA adapters: start as the base model, train only themselves, merge into the same function."""

from __future__ import annotations

import pytest
import torch
from tiny_llama import tiny_llama_config
from transformers import LlamaForCausalLM

from edgekit.vlm.lora import LoraLinear, add_lora, load_merged, lora_state, merge_lora


def _model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(64)).eval()


def test_adapters_start_as_the_base_and_train_alone() -> None:
    model = _model()
    ids = torch.randint(0, 64, (1, 12))
    before = model(input_ids=ids).logits.detach()
    model.requires_grad_(False)
    params = add_lora(model, rank=4)
    assert len(params) == 2 * 2 * 2  # two layers, q and v, A and B
    assert torch.equal(model(input_ids=ids).logits.detach(), before)  # B starts at zero
    optimiser = torch.optim.SGD(params, lr=0.5)
    model(input_ids=ids).logits.square().mean().backward()
    optimiser.step()
    assert [name for name, p in model.named_parameters() if p.grad is not None] == list(lora_state(model))
    assert not torch.allclose(model(input_ids=ids).logits, before)


def test_merged_and_reloaded_adapters_compute_what_the_trained_ones_did() -> None:
    model = _model()
    ids = torch.randint(0, 64, (2, 10))
    add_lora(model, rank=4)
    with torch.no_grad():
        for p in lora_state(model):
            model.get_parameter(p).normal_(0, 0.2)
        adapted = model(input_ids=ids).logits
        state = lora_state(model)
        merge_lora(model)
        assert not any(isinstance(m, LoraLinear) for m in model.modules())
        torch.testing.assert_close(model(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-5)
        fresh = _model()  # the same base weights, adapters from the stored tensors
        load_merged(fresh, state, rank=4)
        torch.testing.assert_close(fresh(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-5)
        with pytest.raises(ValueError, match="miss"):
            load_merged(_model(), {}, rank=4)
