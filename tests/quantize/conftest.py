"""Tiny in-process models for the quantization tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgekit.models.bundle import ModelBundle


class SmallConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(pixels)))
        return self.fc(x.mean((2, 3), keepdim=True).flatten(1))


@pytest.fixture(scope="session")
def small_conv() -> ModelBundle:
    torch.manual_seed(0)
    net = SmallConvNet()
    with torch.no_grad():  # non-trivial BatchNorm statistics, folded by export
        net.bn.running_mean.uniform_(-0.2, 0.2)
        net.bn.running_var.uniform_(0.5, 1.5)
    return ModelBundle(
        spec="tiny:small-conv",
        module=net.eval(),
        example_inputs={"pixels": torch.randn(1, 3, 12, 12)},
        task="classifier",
    )


def _calibration(count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"pixels": rng.standard_normal((1, 3, 12, 12)).astype(np.float32)} for _ in range(count)]


@pytest.fixture(scope="session")
def calibration():
    """``calibration(count, seed=0)``: a fixture, since sibling test folders' conftests share a name."""
    return _calibration
