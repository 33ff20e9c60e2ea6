"""Tiny in-process models for the ExecuTorch exporter tests (built once per session)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgekit.models.bundle import ModelBundle


class TinyConvNet(nn.Module):
    """conv+BN+ReLU, strided conv, depthwise conv + ReLU6, global mean (keepdim=False: XNNPACK
    leaves it out, a real float island), linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.fc = nn.Linear(16, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv1(image)))
        x = torch.relu(self.conv2(x))
        x = nn.functional.relu6(self.depthwise(x))
        return self.fc(x.mean((2, 3)))


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(features))
        x = x + torch.relu(self.fc2(x))
        return self.head(x)


class RMSNorm(nn.Module):
    """As transformers' LlamaRMSNorm computes it, ``.to(torch.float32)`` casts included."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim) + 0.1 * torch.randn(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class TinyDecoder(nn.Module):
    """One LLaMA-style block: RMSNorm, RoPE by rotate-half slices, causal mask from shapes,
    SwiGLU MLP. The ops that broke the int8 XNNPACK program of SmolLM2."""

    def __init__(self, vocab: int = 64, dim: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.embed = nn.Embedding(vocab, dim)
        self.norm1, self.norm2, self.norm3 = RMSNorm(dim), RMSNorm(dim), RMSNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.gate, self.up = nn.Linear(dim, 2 * dim, bias=False), nn.Linear(dim, 2 * dim, bias=False)
        self.down = nn.Linear(2 * dim, dim, bias=False)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        inv_freq = 1.0 / 10000 ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        batch, length = input_ids.shape
        hidden = self.embed(input_ids)
        angles = torch.arange(length, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        angles = torch.cat((angles, angles), dim=-1)[None, None]
        cos, sin = angles.cos(), angles.sin()
        positions = torch.arange(length)
        mask = ((positions[None, :] > positions[:, None]).to(hidden.dtype) * -1.0e4)[None, None]

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.heads, self.head_dim).transpose(1, 2)

        x = self.norm1(hidden)
        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        scores = torch.matmul(q, k.transpose(2, 3)) * self.head_dim**-0.5 + mask
        out = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).reshape(batch, length, -1)
        hidden = hidden + self.o(out)
        x = self.norm2(hidden)
        hidden = hidden + self.down(nn.functional.silu(self.gate(x)) * self.up(x))
        return self.lm_head(self.norm3(hidden))


def _bundle(module: nn.Module, name: str, inputs: dict[str, torch.Tensor], task: str) -> ModelBundle:
    return ModelBundle(spec=f"tiny:{name}", module=module.eval(), example_inputs=inputs, task=task)


@pytest.fixture(scope="session")
def conv_bundle() -> ModelBundle:
    torch.manual_seed(0)
    return _bundle(TinyConvNet(), "conv", {"image": torch.randn(1, 1, 16, 16)}, "classifier")


@pytest.fixture(scope="session")
def mlp_bundle() -> ModelBundle:
    torch.manual_seed(1)
    return _bundle(TinyMLP(), "mlp", {"features": torch.randn(4, 32)}, "classifier")


@pytest.fixture(scope="session")
def decoder_bundle() -> ModelBundle:
    torch.manual_seed(2)
    ids = torch.randint(0, 64, (1, 8))
    return _bundle(TinyDecoder(), "decoder", {"input_ids": ids}, "causal-lm")


def _samples(bundle: ModelBundle, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Random inputs shaped like the example inputs (token ids for integer inputs)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        item = {}
        for name, example in bundle.example_inputs.items():
            if example.dtype.is_floating_point:
                item[name] = rng.standard_normal(tuple(example.shape)).astype(np.float32)
            else:
                item[name] = rng.integers(0, 64, tuple(example.shape)).astype(np.int64)
        out.append(item)
    return out


@pytest.fixture(scope="session")
def samples():
    """``samples(bundle, count, seed)``: a fixture, since sibling test folders' conftests share a name."""
    return _samples
