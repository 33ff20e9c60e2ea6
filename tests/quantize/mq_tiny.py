"""A tiny random LLaMA and calibration windows for the MobileQuant tests (imported, not a test)."""

from __future__ import annotations

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from edgekit.models.llama import CausalLMWithCache


def tiny_llama(layers: int = 2) -> CausalLMWithCache:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=101,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                param.add_(0.3 * torch.randn_like(param))
    return CausalLMWithCache(model).eval()


def calib(count: int = 6, length: int = 24) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    return [{"input_ids": rng.integers(0, 101, (1, length), dtype=np.int64)} for _ in range(count)]


def ids_from(feed: dict[str, np.ndarray]) -> torch.Tensor:
    return torch.as_tensor(np.asarray(feed["input_ids"]), dtype=torch.long).reshape(1, -1)
