"""CEMA's cloud foundation model for Fashion-MNIST (the edge student is the zoo's ``fmnist-cnn``).

Trained here on the real Fashion-MNIST training set (fixed seed) and cached. It is wider and
deeper than the edge model and trained with generic augmentation (random shifts, flips, mild
noise, contrast and brightness jitter, light blur) — none of the Fashion-MNIST-C families at
their test parameters — so it is more robust, as a foundation model should be. It takes raw
pixels in [0, 1] (no input standardisation).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgekit.cache import cached_entry
from edgekit.models.bundle import ModelBundle
from edgekit.models.sources import state_hash

SEED = 7


class FoundationCNN(nn.Module):
    """A VGG-ish network (five conv-BN-ReLU layers, 12.4M MACs, 6.5x fmnist-cnn's 1.9M), dropout before the head."""

    def __init__(self, width: int = 24) -> None:
        super().__init__()

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        w = width
        self.features = nn.Sequential(
            *conv(1, w),
            nn.MaxPool2d(2),
            *conv(w, 2 * w),
            *conv(2 * w, 2 * w),
            nn.MaxPool2d(2),
            *conv(2 * w, 4 * w),
            *conv(4 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(0.2),
        )
        self.head = nn.Linear(4 * w, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Generic robustness augmentation: shift, flip, contrast/brightness jitter, mild noise, blur."""
    n = x.shape[0]
    shifts = torch.randint(-2, 3, (2,), generator=generator).tolist()
    x = torch.roll(x, shifts=shifts, dims=(2, 3))
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    mean = x.mean(dim=(2, 3), keepdim=True)
    scale = 0.3 + 0.9 * torch.rand(n, 1, 1, 1, generator=generator)
    x = (x - mean) * scale + mean + 0.25 * (torch.rand(n, 1, 1, 1, generator=generator) - 0.3)
    noisy = torch.rand(n, 1, 1, 1, generator=generator) < 0.5
    sigma = 0.15 * torch.rand(n, 1, 1, 1, generator=generator)
    x = x + noisy * sigma * torch.randn(x.shape, generator=generator)
    blurred = torch.rand(n, generator=generator) < 0.3
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]).div(16).view(1, 1, 3, 3)
    x = torch.where(blurred[:, None, None, None], nn.functional.conv2d(x, kernel, padding=1), x)
    return x.clamp(0, 1)


def train(model: nn.Module, epochs: int, augmented: bool, lr: float = 2e-3, batch: int = 128) -> nn.Module:
    """Adam + one-cycle cosine schedule on the 60k training images; returns the model in eval mode."""
    from edgekit.data.fmnist_c import raw_split

    images, labels = raw_split("train")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convs: one thread is faster than two contended ones on a shared box
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels)
    generator = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * (len(x_all) // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x_all), generator=generator)
        for start in range(0, len(order) - batch + 1, batch):
            index = order[start : start + batch]
            x = x_all[index]
            if augmented:
                x = augment(x, generator)
            loss = nn.functional.cross_entropy(model(x), y_all[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    torch.set_num_threads(threads)
    return model.eval()


def _cached_model(name: str, make: type[nn.Module], epochs: int, augmented: bool) -> nn.Module:
    def build(directory: Path) -> None:
        torch.manual_seed(SEED)
        torch.save(train(make(), epochs, augmented).state_dict(), directory / "model.pt")

    entry = cached_entry(f"models/{name}-s{SEED}-e{epochs}", build)
    model = make()
    model.load_state_dict(torch.load(entry / "model.pt", weights_only=True))
    return model.eval()


def _bundle(spec: str, module: nn.Module, description: str) -> ModelBundle:
    from edgekit.data.fmnist_c import LABELS

    return ModelBundle(
        spec=spec,
        module=module,
        example_inputs={"x": torch.zeros(1, 1, 28, 28)},
        task="classifier",
        output_names=["logits"],
        dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
        preprocess=lambda raw: {"x": torch.as_tensor(np.asarray(raw, dtype=np.float32)).reshape(1, 1, 28, 28)},
        labels=list(LABELS),
        dataset="fashion-mnist",
        source_hash=state_hash(module),
        description=description,
    )


def load_foundation() -> ModelBundle:
    """The CEMA cloud foundation model (``fmnist-foundation``): wider VGG-ish CNN, augmented, 3 epochs."""
    module = _cached_model("fmnist-foundation", FoundationCNN, epochs=3, augmented=True)
    return _bundle("zoo:fmnist-foundation", module, "VGG-style CNN trained with augmentation, CEMA's cloud model")
