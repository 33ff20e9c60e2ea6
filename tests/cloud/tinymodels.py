"""Tiny seeded Fashion-MNIST-shaped classifiers for the CEMA service tests (``pkg.module:factory`` specs)."""

from __future__ import annotations

import torch
from torch import nn

from edgekit.models.bundle import ModelBundle


class TinyBN(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(4),
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _bundle(width: int, seed: int) -> ModelBundle:
    torch.manual_seed(seed)
    module = TinyBN(width)
    with torch.no_grad():  # non-trivial statistics, so a swapped set visibly changes the output
        for layer in module.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.running_mean.uniform_(-0.2, 0.2)
                layer.running_var.uniform_(0.5, 1.5)
        module.head.weight.mul_(25.0)  # confident enough that CEMA's entropy window selects some samples
    return ModelBundle(
        spec=f"tests.cloud.tinymodels:w{width}",
        module=module.eval(),
        example_inputs={"x": torch.zeros(1, 1, 28, 28)},
        task="classifier",
        output_names=["logits"],
        labels=[str(i) for i in range(10)],
        source_hash=f"tiny{width}",
    )


def student() -> ModelBundle:
    return _bundle(4, 0)


def teacher() -> ModelBundle:
    return _bundle(8, 1)
