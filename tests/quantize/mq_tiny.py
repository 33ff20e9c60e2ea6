"""A tiny random LLaMA and calibration windows for the MobileQuant tests (imported, not a test)."""

from __future__ import annotations

import numpy as np
import torch
from tiny_llama import perturb_norms, tiny_llama_config
from transformers import LlamaForCausalLM

from edgekit.models.llama import CausalLMWithCache

SINK_TOKEN = 0


def tiny_llama(layers: int = 2, sink_activation: float = 0.0) -> CausalLMWithCache:
    """``sink_activation`` > 0 plants a massive activation, as real LLMs grow on their attention-sink
    token (SmolLM2: ~24,800 in one residual channel): layer 0's MLP writes a huge value into one
    residual channel for :data:`SINK_TOKEN` only, while every other token's stream stays O(1)."""
    torch.manual_seed(0)
    config = tiny_llama_config(
        101, layers=layers, hidden=48, heads=6, rope_parameters={"rope_type": "default", "rope_theta": 5000.0}
    )
    model = perturb_norms(LlamaForCausalLM(config).eval())
    with torch.no_grad():
        if sink_activation:
            # embedding channel 7 flags the sink token; MLP unit 5 squares it into residual channel 11
            flag, unit, channel = 7, 5, 11
            model.model.embed_tokens.weight[:, flag] = 0.0
            model.model.embed_tokens.weight[SINK_TOKEN, flag] = 1.0
            mlp = model.model.layers[0].mlp
            for proj in (mlp.gate_proj, mlp.up_proj):
                proj.weight[unit] = 0.0
                proj.weight[unit, flag] = 20.0
            mlp.down_proj.weight[:, unit] = 0.0
            mlp.down_proj.weight[channel, unit] = sink_activation
    return CausalLMWithCache(model).eval()


def calib(count: int = 6, length: int = 24, sink: bool = False) -> list[dict[str, np.ndarray]]:
    """Random windows; with ``sink`` each starts with :data:`SINK_TOKEN` (as texts start with BOS)."""
    rng = np.random.default_rng(3)
    windows = [rng.integers(1 if sink else 0, 101, (1, length), dtype=np.int64) for _ in range(count)]
    for window in windows if sink else []:
        window[0, 0] = SINK_TOKEN
    return [{"input_ids": window} for window in windows]


def ids_from(feed: dict[str, np.ndarray]) -> torch.Tensor:
    return torch.as_tensor(np.asarray(feed["input_ids"]), dtype=torch.long).reshape(1, -1)
