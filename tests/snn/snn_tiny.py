"""Shared by the spiking tests: the tiny VGG and ResNet they train, and helpers.

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


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block (post-activation), shortcut computed first as torchvision does."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + identity)


class TinyResNet(nn.Module):
    """Stem conv, an identity-shortcut block and a downsampling block, global pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = BasicBlock(8, 8)
        self.layer2 = BasicBlock(8, 16, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layer2(self.layer1(self.stem(x)))), 1))


def train(model: nn.Module, fmnist: dict[str, torch.Tensor], epochs: int = 4) -> nn.Module:
    """A few seconds of Adam on the 2000 training images (the caller seeds the initialisation)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = fmnist["train_x"], fmnist["train_y"]
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 200):
            index = order[start : start + 200]
            loss = nn.functional.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())
