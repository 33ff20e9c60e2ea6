"""Tiny spiking-test fixtures: real Fashion-MNIST images and a tiny ANN trained on them in seconds."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from snn_tiny import TinyVGG
from torch import nn

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _idx(name: str) -> np.ndarray:
    with gzip.open(FASHION_MNIST / name) as handle:
        payload = handle.read()
    ndim = payload[3]
    shape = np.frombuffer(payload, ">u4", ndim, 4)
    return np.frombuffer(payload, np.uint8, offset=4 + 4 * ndim).reshape(shape)


@pytest.fixture(scope="session")
def fmnist() -> dict[str, torch.Tensor]:
    """2000 training and 1000 test images, normalised like the zoo models, with labels."""
    if not FASHION_MNIST.is_dir():
        pytest.skip("Fashion-MNIST is not installed")

    def images(name: str, count: int) -> torch.Tensor:
        return ((torch.tensor(_idx(name)[:count]).float() / 255 - 0.286) / 0.353).unsqueeze(1)

    return {
        "train_x": images("train-images-idx3-ubyte.gz", 2000),
        "train_y": torch.tensor(_idx("train-labels-idx1-ubyte.gz")[:2000].astype(np.int64)),
        "test_x": images("t10k-images-idx3-ubyte.gz", 1000),
        "test_y": torch.tensor(_idx("t10k-labels-idx1-ubyte.gz")[:1000].astype(np.int64)),
    }


@pytest.fixture(scope="session")
def tiny_ann(fmnist) -> nn.Module:
    """TinyVGG trained on 2000 real images for a few seconds (fixed seed)."""
    torch.manual_seed(0)
    model = TinyVGG()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = fmnist["train_x"], fmnist["train_y"]
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 200):
            index = order[start : start + 200]
            loss = nn.functional.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()
