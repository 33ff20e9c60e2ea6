"""Shared by the spiking tests: the tiny VGG they train and an accuracy helper.

A named module, not ``conftest``: ``from conftest import ...`` resolves to whichever test
folder's conftest was imported first, so ``pytest tests/snn tests/quantize`` broke at collection.
"""

from __future__ import annotations

import torch
from torch import nn


class TinyVGG(nn.Sequential):
    """conv-BN-ReLU-avgpool x2, linear-ReLU, dropout, linear: every layer kind the converter folds."""

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(1, 6, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.AvgPool2d(2),
            nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AvgPool2d(2),
            nn.Flatten(), nn.Linear(8 * 3 * 3, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 10),
        )  # fmt: skip


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())
