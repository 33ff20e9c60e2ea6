"""Tiny in-process models, one per op family, and feeds for them (the ONNX exporter tests)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgekit.models.bundle import ModelBundle


class TinyConvNet(nn.Module):
    """Conv + ReLU + strided Conv + global pool + Linear: the CNN classifier family."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(image))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(features)))))


class TinyBlock(nn.Module):
    """Pre-norm transformer block: LayerNorm, single-head attention with softmax, GELU MLP."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)
        self.scale = dim**-0.5

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.norm1(tokens)
        scores = torch.matmul(self.q(x), self.k(x).transpose(1, 2)) * self.scale
        attended = torch.matmul(torch.softmax(scores, dim=-1), self.v(x))
        hidden = tokens + self.out(attended)
        return hidden + self.down(nn.functional.gelu(self.up(self.norm2(hidden))))


def _bundle(module: nn.Module, name: str, example: torch.Tensor, task: str = "classifier") -> ModelBundle:
    return ModelBundle(
        spec=f"test:{name}",
        module=module.eval(),
        example_inputs={name: example},
        task=task,
        output_names=["output"],
        dynamic_axes={name: {0: "batch"}, "output": {0: "batch"}},
    )


def conv_bundle() -> ModelBundle:
    torch.manual_seed(0)
    return _bundle(TinyConvNet(), "image", torch.randn(2, 3, 16, 16))


def mlp_bundle() -> ModelBundle:
    torch.manual_seed(1)
    return _bundle(TinyMLP(), "features", torch.randn(4, 32))


def block_bundle() -> ModelBundle:
    torch.manual_seed(2)
    return _bundle(TinyBlock(), "tokens", torch.randn(2, 6, 32), task="generic")


def calibration(bundle: ModelBundle, count: int = 8, seed: int = 3) -> list[dict[str, np.ndarray]]:
    """Calibration feeds shaped like the example input (batch varies, as real data would)."""
    generator = torch.Generator().manual_seed(seed)
    ((name, example),) = bundle.example_inputs.items()
    shape = (4, *example.shape[1:])
    return [{name: torch.randn(shape, generator=generator).numpy()} for _ in range(count)]


def evaluation(bundle: ModelBundle, seed: int = 4) -> dict[str, np.ndarray]:
    generator = torch.Generator().manual_seed(seed)
    ((name, example),) = bundle.example_inputs.items()
    return {name: torch.randn((8, *example.shape[1:]), generator=generator).numpy()}


def torch_output(bundle: ModelBundle, feed: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return bundle.module(**{k: torch.from_numpy(v) for k, v in feed.items()}).numpy()
