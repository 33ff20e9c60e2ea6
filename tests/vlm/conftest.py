"""Tiny randomly initialised vision models for the HiRED tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch


def tiny_vit(layers: int = 4, image: int = 16, patch: int = 4):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        patch_size=patch,
        image_size=image,
    )
    return Dinov2Model(config).eval()


@pytest.fixture(scope="session")
def make_tiny_vit() -> Callable:
    return tiny_vit
