"""Fake-quantization modules with learnable parameters (MobileQuant's ranges and weight clipping).

The arithmetic copies what onnxruntime's QDQ graph computes, so a simulated model trained here
and its exported graph agree: activations are asymmetric unsigned per-tensor
(``q = clamp(round(x / scale) + zero_point, 0, 2^bits - 1)``, round half to even), weights are
symmetric signed (int8 on [-127, 127] with ``scale = absmax / 127``; int4 on [-8, 7] with
``scale = absmax / 7.5``, onnxruntime's symmetric int4 grid).
"""

from __future__ import annotations

import torch
from torch import nn

from edgekit.quantize.spec import TensorOverride

# onnxruntime's QNN path rejects ranges narrower than this; the exporter enforces the same floor.
MINIMUM_REAL_RANGE = 1e-4


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (half to even, like QuantizeLinear) with a straight-through gradient."""
    return x + (torch.round(x) - x).detach()


class ActQuant(nn.Module):
    """Per-tensor activation fake-quant with a learned scale α and offset β (MobileQuant).

    ``x_int = clamp(round_ste(x / α) - β, 0, q_max)`` and ``x̂ = (x_int + β) · α``; β is rounded
    (straight through) so the exported zero point ``-β`` is an integer and the simulation is
    exactly what the graph computes. Disabled, it is the identity and leaves no trace in an
    exported graph. While ``observing`` it records the running min/max (the MinMax init).
    """

    def __init__(self, bits: int) -> None:
        super().__init__()
        if bits not in (8, 16):
            raise ValueError(f"activation bits must be 8 or 16, got {bits}")
        self.bits = bits
        self.qmax = float(2**bits - 1)
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.offset = nn.Parameter(torch.tensor(0.0))
        self.register_buffer("low", torch.tensor(float("inf")))
        self.register_buffer("high", torch.tensor(float("-inf")))
        self.enabled = False
        self.observing = False

    def extra_repr(self) -> str:
        return f"bits={self.bits}, enabled={self.enabled}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            detached = x.detach()
            self.low.copy_(torch.minimum(self.low, detached.min()))
            self.high.copy_(torch.maximum(self.high, detached.max()))
        if not self.enabled:
            return x
        scale = self.scale.abs().clamp_min(1e-12)
        beta = round_ste(self.offset).clamp(-self.qmax, 0.0)
        q = torch.clamp(round_ste(x / scale) - beta, 0.0, self.qmax)
        return (q + beta) * scale

    @torch.no_grad()
    def init_from_observed(self) -> None:
        """Scale and offset from the observed range, as onnxruntime's MinMax would set them."""
        if not torch.isfinite(self.low) or not torch.isfinite(self.high):
            raise RuntimeError("activation range was never observed")
        self.set_range(float(self.low), float(self.high))

    @torch.no_grad()
    def set_range(self, low: float, high: float) -> None:
        low, high = min(low, 0.0), max(high, 0.0)
        high = max(high, low + MINIMUM_REAL_RANGE)
        scale = (high - low) / self.qmax
        zero_point = min(max(round(-low / scale), 0), int(self.qmax))
        self.scale.fill_(scale)
        self.offset.fill_(-float(zero_point))

    def override(self) -> TensorOverride:
        """The learned quantization as the exporter's fixed (never recalibrated) tensor override."""
        scale = float(self.scale.detach().abs().float())
        zero_point = int(min(max(-round(float(self.offset.detach())), 0), int(self.qmax)))
        if scale * self.qmax < MINIMUM_REAL_RANGE:
            scale = MINIMUM_REAL_RANGE / self.qmax
        return TensorOverride(bits=self.bits, scale=scale, zero_point=zero_point)


class WeightQuant(nn.Module):
    """Symmetric weight fake-quant with learnable clipping: bound = sigmoid(b) · max|W| (b₀ = 4).

    One ``b`` per output channel (``per_channel``) or one for the tensor. The clipped weight
    ``clamp(W, -bound, bound)`` is what gets folded for export: its absmax *is* the bound, so
    onnxruntime's MinMax weight scale reproduces the learned one exactly.
    """

    def __init__(self, out_features: int, bits: int, per_channel: bool, init: float = 4.0, learn: bool = True) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"weight bits must be 4 or 8, got {bits}")
        self.bits = bits
        self.per_channel = per_channel
        self.logit = nn.Parameter(torch.full((out_features if per_channel else 1, 1), float(init)), requires_grad=learn)
        self.learn = learn
        self.enabled = False
        # int8 symmetric: [-127, 127], scale = bound/127; int4: [-8, 7], scale = bound/7.5
        self.qlow, self.qhigh, self.steps = (-127.0, 127.0, 127.0) if bits == 8 else (-8.0, 7.0, 7.5)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_channel={self.per_channel}, learn={self.learn}"

    def bound(self, weight: torch.Tensor) -> torch.Tensor:
        absmax = weight.abs().amax(dim=1, keepdim=True) if self.per_channel else weight.abs().amax().view(1, 1)
        if not self.learn:
            return absmax
        return torch.sigmoid(self.logit) * absmax

    def clip(self, weight: torch.Tensor) -> torch.Tensor:
        bound = self.bound(weight)
        return torch.maximum(torch.minimum(weight, bound), -bound)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.quantize(weight) if self.enabled else weight

    def quantize(self, weight: torch.Tensor) -> torch.Tensor:
        bound = self.bound(weight)
        scale = (bound / self.steps).clamp_min(1e-12)
        clipped = torch.maximum(torch.minimum(weight, bound), -bound)
        return torch.clamp(round_ste(clipped / scale), self.qlow, self.qhigh) * scale


def symmetric_fake_quant(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-tensor symmetric fake-quant on [-(2^(b-1) - 1), 2^(b-1) - 1], onnxruntime's grid for a
    symmetric initializer (a norm's weight), with a straight-through gradient."""
    steps = float(2 ** (bits - 1) - 1)
    scale = (weight.detach().abs().amax() / steps).clamp_min(1e-12)
    return torch.clamp(round_ste(weight / scale), -steps, steps) * scale


class QuantSwitches:
    """The switches both simulated models (LLaMA, encoders) share over their fake-quant modules.

    A subclass holds ``acts`` (one ModuleDict of :class:`ActQuant` per block), ``head_acts``,
    ``transforms`` and ``folded``, and lists its :class:`WeightQuant` modules in ``weight_quants``.
    ``quant_norm_weights`` follows the weight switch (norm weights and constant tables).
    """

    acts: nn.ModuleList
    head_acts: nn.ModuleDict
    transforms: nn.ModuleList
    folded: bool
    quant_norm_weights: bool

    def weight_quants(self) -> list[WeightQuant]:
        raise NotImplementedError

    def switch_off(self) -> None:
        """The state a model starts in: every parameter frozen (the optimiser switches on what it
        trains), nothing folded, no quantization."""
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        self.folded = False
        self.set_quant(weights=False, acts=False)

    def mark_folded(self) -> None:
        """After a fold wrote transforms and clipping into the weights: weight fake-quant is off for
        good (the folded weights are what the exporter quantizes); activation switches stay."""
        self.folded = True
        for quant in self.weight_quants():
            quant.enabled = False
        self.quant_norm_weights = False

    def act_quants(self) -> list[ActQuant]:
        return [q for sites in self.acts for q in sites.values()] + list(self.head_acts.values())

    def set_quant(self, weights: bool, acts: bool):
        for quant in self.weight_quants():
            quant.enabled = weights and not self.folded
        self.quant_norm_weights = weights and not self.folded
        for quant in self.act_quants():
            quant.enabled = acts
        return self

    def observe(self, on: bool) -> None:
        for quant in self.act_quants():
            quant.observing = on

    def transform_parameters(self) -> list[nn.Parameter]:
        return [p for t in self.transforms for p in t.parameters()]

    def clip_parameters(self) -> list[nn.Parameter]:
        return [q.logit for q in self.weight_quants() if q.learn]
