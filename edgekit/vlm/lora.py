"""Low-rank adapters on a frozen LLaMA-family model's attention projections (LoRA, Hu et al. 2021).

The zoo VLM needs them: SmolLM2-135M-Instruct, frozen, answers "what is in the top-left?" about a
scene *described in text* at close to chance (5 of 20 held-out scenes, likeliest of the ten names),
so no projector alone can make it read a corner's tokens. A rank-8 adapter on q/v of every layer
learns that from a few hundred examples. Adapters are trained, stored (a few MB) and then merged
into the weights, so inference runs the plain model at its plain cost.
"""

from __future__ import annotations

import math

import torch
from torch import nn

TARGETS = ("q_proj", "v_proj")


class LoraLinear(nn.Module):
    """``base(x) + scale · x Aᵀ Bᵀ``; B starts at zero, so the adapted model starts as the base."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight += self.scale * self.lora_b @ self.lora_a
        return self.base


def _attention_modules(hf_model: nn.Module) -> list[nn.Module]:
    return [layer.self_attn for layer in hf_model.model.layers]


def add_lora(hf_model: nn.Module, rank: int = 8, alpha: float = 16.0) -> list[nn.Parameter]:
    """Wrap every layer's q/v projection; returns the adapter parameters (the only trainable ones)."""
    params: list[nn.Parameter] = []
    for attention in _attention_modules(hf_model):
        for name in TARGETS:
            adapter = LoraLinear(getattr(attention, name), rank, alpha)
            setattr(attention, name, adapter)
            params += [adapter.lora_a, adapter.lora_b]
    return params


def lora_state(hf_model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors by parameter name (what the cache stores)."""
    return {name: p.detach().clone() for name, p in hf_model.named_parameters() if name.endswith(("lora_a", "lora_b"))}


def merge_lora(hf_model: nn.Module) -> None:
    """Fold every adapter into its projection's weight and drop the wrapper."""
    for attention in _attention_modules(hf_model):
        for name in TARGETS:
            module = getattr(attention, name)
            if isinstance(module, LoraLinear):
                setattr(attention, name, module.merged())


def load_merged(hf_model: nn.Module, state: dict[str, torch.Tensor], rank: int, alpha: float = 16.0) -> None:
    """Apply stored adapters (from :func:`lora_state`) to a fresh model and merge them."""
    add_lora(hf_model, rank, alpha)
    missing = set(lora_state(hf_model)) - set(state)
    if missing:
        raise ValueError(f"stored adapters miss {len(missing)} tensors, e.g. {sorted(missing)[0]}")
    hf_model.load_state_dict(state, strict=False)
    merge_lora(hf_model)
