"""A tiny random LLaMA built in-process (6 layers), shared by the sorted tests."""

from __future__ import annotations

import torch
from tiny_llama import perturb_norms, tiny_llama_config
from transformers import LlamaForCausalLM

VOCAB = 97


def tiny_llama(layers: int = 6, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return perturb_norms(LlamaForCausalLM(tiny_llama_config(VOCAB, layers=layers)).eval())


def token_ids(length: int, seed: int = 1, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
