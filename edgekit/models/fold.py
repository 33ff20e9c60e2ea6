"""BatchNorm folding: a conv/linear followed by BatchNorm (eval statistics) as one layer.

Both the spiking conversion (IIR-SNN starts from the ANN with BatchNorm folded into its weights)
and MobileQuant's conv nets (the exported graph runs folded convolutions) need it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def fold_batchnorm(layer: nn.Module, norm: nn.BatchNorm1d | nn.BatchNorm2d) -> nn.Module:
    """conv/linear followed by BatchNorm (eval statistics) -> one conv/linear with a bias."""
    folded = copy.deepcopy(layer).eval()
    with torch.no_grad():
        scale = (
            norm.weight / torch.sqrt(norm.running_var + norm.eps)
            if norm.affine
            else 1.0 / torch.sqrt(norm.running_var + norm.eps)
        )
        shift = norm.bias if norm.affine else torch.zeros_like(norm.running_mean)
        bias = layer.bias if layer.bias is not None else torch.zeros_like(norm.running_mean)
        shape = (-1,) + (1,) * (folded.weight.dim() - 1)
        weight = folded.weight * scale.reshape(shape)
        folded.weight = nn.Parameter(weight.detach().clone())
        folded.bias = nn.Parameter(((bias - norm.running_mean) * scale + shift).detach().clone())
    return folded
