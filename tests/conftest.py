"""Shared fixtures: tiny in-process models and a throwaway cache per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgekit.models.bundle import ModelBundle

REPO = Path(__file__).resolve().parents[1]


class TinyConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1),
            torch.nn.BatchNorm2d(8),
            torch.nn.ReLU(),
            torch.nn.AvgPool2d(2),
            torch.nn.Conv2d(8, 16, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
        )
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def tiny_conv_bundle(seed: int = 0) -> ModelBundle:
    torch.manual_seed(seed)
    module = TinyConvNet().eval()
    return ModelBundle(
        spec="test:tiny-conv",
        module=module,
        example_inputs={"x": torch.randn(1, 1, 28, 28)},
        task="classifier",
        output_names=["logits"],
        dynamic_axes={"x": {0: "batch"}},
        source_hash="tiny",
    )


@pytest.fixture
def tiny_conv() -> ModelBundle:
    return tiny_conv_bundle()


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real console entry point in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-c", "from edgekit.cli import main; main()", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        cwd=cwd or REPO,
        timeout=900,
    )


@pytest.fixture(scope="session")
def edgekit_cli():
    """``edgekit_cli(*args, cwd=..., env=...)`` runs the real CLI in a subprocess."""
    return run_cli
