"""The tiny random LLaMA configuration the LM, sorted, quantization and VLM tests build in-process."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama_config(vocab_size: int, layers: int = 2, hidden: int = 32, heads: int = 4, **overrides) -> LlamaConfig:
    """Grouped-query attention (2 KV heads) and tied embeddings, as in SmolLM2, at toy width."""
    settings = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 2,
        "head_dim": hidden // heads,
        "max_position_embeddings": 256,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": True,
        **overrides,
    }
    return LlamaConfig(**settings)


def perturb_norms(model: LlamaForCausalLM, scale: float = 0.3) -> LlamaForCausalLM:
    """RMSNorm weights start at 1; perturbed, a skipped or misplaced norm shows in the outputs."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(scale * torch.randn_like(param))
    return model
