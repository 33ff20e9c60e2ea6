"""SmoothQuant (α) initialisation of MobileQuant's equivalent transforms, from calibration maxima.

For each site the scale s balances a channel's activation maximum against its weight maximum,
``s_j = max|X_j|^α / max|W_j|^(1-α)``, so after ``X / s`` and ``W · s`` both have comparable
ranges. Used alone (then MinMax ranges, no learning) it is the SmoothQuant baseline.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from edgekit.quantize.encoder import QuantEncoder
from edgekit.quantize.llama import QuantLlama

EPSILON = 1e-5


def _balance(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    return x_max.clamp_min(EPSILON).pow(alpha) / w_max.clamp_min(EPSILON).pow(1.0 - alpha)


def _pairs(per_dim: torch.Tensor) -> torch.Tensor:
    """[kv, d] -> [kv, d/2]: RoPE's channel pairs share one scale, so take the pair's maximum."""
    half = per_dim.shape[-1] // 2
    return torch.maximum(per_dim[..., :half], per_dim[..., half:])


@torch.no_grad()
def channel_maxima(model: QuantLlama | QuantEncoder, batches: Iterable) -> dict[str, torch.Tensor]:
    """Per-channel absolute maxima at the transform sites, float model, transforms as they are."""
    model.set_quant(weights=False, acts=False)
    model.recorder = {}
    try:
        for batch in batches:
            model.hidden_state(batch)
        return model.recorder
    finally:
        model.recorder = None


@torch.no_grad()
def smoothquant_init(model: QuantLlama | QuantEncoder, batches: Iterable, alpha: float = 0.5) -> None:
    """Set every block's transform scales from SmoothQuant's rule (model must be at identity)."""
    stats = channel_maxima(model, batches)
    if isinstance(model, QuantEncoder):
        _init_encoder(model, stats, alpha)
        return
    kv, groups, dim = model.num_kv_heads, model.groups, model.head_dim
    for index, layer in enumerate(model.layers):
        t = model.transforms[index]
        attn, mlp = layer.self_attn, layer.mlp
        qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).abs().amax(dim=0)
        t.attn.copy_(_balance(stats[f"{index}.attn_in"], qkv, alpha))
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).abs().amax(dim=0)
        t.mlp.copy_(_balance(stats[f"{index}.mlp_in"], gate_up, alpha))
        # q <-> k: q / s and k * s leave q·kᵀ unchanged; balance the two maxima
        t.qk.copy_(_balance(_pairs(stats[f"{index}.q_rope"]), _pairs(stats[f"{index}.k_rope"]), alpha))
        # v -> o: the attention output is linear in v, so v rows / s scale o_proj's input channels
        out_max = stats[f"{index}.attn_out"].view(kv, groups, dim).amax(dim=1)
        o_max = attn.o_proj.weight.abs().amax(dim=0).view(kv, groups, dim).amax(dim=1)
        t.vo.copy_(_balance(out_max, o_max, alpha))
        # up -> down
        t.ud.copy_(_balance(stats[f"{index}.prod"], mlp.down_proj.weight.abs().amax(dim=0), alpha))


def _init_encoder(model: QuantEncoder, stats: dict[str, torch.Tensor], alpha: float) -> None:
    for index, block in enumerate(model.layers):
        t = model.transforms[index]
        t.qk.copy_(_balance(stats[f"{index}.q"], stats[f"{index}.k"], alpha))
        t.vo.copy_(_balance(stats[f"{index}.attn_out"], block.o.weight.abs().amax(dim=0), alpha))
        if model.pre_norm:
            qkv = torch.cat([block.q.weight, block.k.weight, block.v.weight]).abs().amax(dim=0)
            t.attn.copy_(_balance(stats[f"{index}.attn_in"], qkv, alpha))
            t.mlp.copy_(_balance(stats[f"{index}.mlp_in"], block.fc1.weight.abs().amax(dim=0), alpha))
