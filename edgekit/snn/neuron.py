"""The LIF neuron of IIR-SNN and its surrogate gradient.

Dynamics per timestep (Chowdhury et al., "One Timestep is All You Need")::

    u <- lambda * u + W s          (leak lambda trainable per layer, starts at 1 = IF, clamped <= 1)
    s  = 1 if u / V_th - 1 > 0     (V_th trainable per layer)
    u <- u - V_th * s              (soft reset: the excess carries over)

The spike is a step function; training backpropagates through it with the paper's surrogate
0.3 * max(0, 1 - |u / V_th - 1|), which :class:`SpikeFunction` implements as an autograd Function.
"""

from __future__ import annotations

import torch
from torch import nn

SURROGATE_SCALE = 0.3


class SpikeFunction(torch.autograd.Function):
    """spike = [u / V_th - 1 > 0]; d spike / d x = 0.3 * max(0, 1 - |x|) with x = u / V_th - 1.

    The forward compares ``u > V_th``, which for V_th > 0 is the same test (``fl(u/V_th) - 1 > 0``
    iff ``fl(u/V_th) > 1``) and is exactly what the exported graph computes, so simulated and
    exported spikes agree bit for bit. The backward returns gradients for both ``u`` and ``V_th``
    (chain rule through x), so the threshold learns.
    """

    @staticmethod
    def forward(ctx, u: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(u, threshold)
        return (u > threshold).to(u.dtype)

    @staticmethod
    def backward(ctx, grad_spike: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        u, threshold = ctx.saved_tensors
        x = u / threshold - 1.0
        grad_x = grad_spike * surrogate(x)
        grad_u = grad_x / threshold if ctx.needs_input_grad[0] else None
        grad_threshold = None
        if ctx.needs_input_grad[1]:
            grad_threshold = (grad_x * (-u / threshold**2)).sum().reshape(threshold.shape)
        return grad_u, grad_threshold


def surrogate(x: torch.Tensor) -> torch.Tensor:
    """The paper's pseudo-derivative of the spike w.r.t. x = u / V_th - 1."""
    return SURROGATE_SCALE * torch.clamp(1.0 - x.abs(), min=0.0)


def spike(u: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return SpikeFunction.apply(u, threshold)


class LIF(nn.Module):
    """A layer of LIF neurons sharing one leak and one threshold (per-layer, as in the paper)."""

    def __init__(self, threshold: float, leak: float = 1.0) -> None:
        super().__init__()
        if not threshold > 0:
            raise ValueError(f"threshold must be positive, got {threshold}")
        self.threshold = nn.Parameter(torch.tensor(float(threshold)))
        self.leak = nn.Parameter(torch.tensor(float(leak)))

    def step(self, current: torch.Tensor, u: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One timestep: returns (spikes, membrane after reset). ``u=None`` is the resting state 0."""
        u = current if u is None else self.leak.clamp(max=1.0) * u + current
        spikes = spike(u, self.threshold)
        # the reset subtracts V_th where a spike fired; it is not a path for the surrogate (as in the
        # reference code), only for the threshold's own gradient
        return spikes, u - self.threshold * spikes.detach()

    @torch.no_grad()
    def constrain(self) -> None:
        """Keep the parameters where the model is defined: leak <= 1, threshold > 0."""
        self.leak.clamp_(max=1.0)
        self.threshold.clamp_(min=1e-4)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold.item():.4g}, leak={self.leak.item():.4g}"
