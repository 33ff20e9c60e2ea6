"""train_classifier on a tiny real subset: it learns, it is deterministic, it checks its inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgekit.data.fashion_mnist import arrays
from edgekit.errors import EdgekitError
from edgekit.models.training import accuracy, augment_batch, to_tensor, train_classifier


def tiny_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(4),
        nn.Flatten(), nn.Dropout(0.1), nn.Linear(8 * 7 * 7, 10),
    )  # fmt: skip


@pytest.fixture(scope="module")
def subset() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    images, labels = arrays("calib")
    test_images, test_labels = arrays("eval")
    return images[:1024], labels[:1024], test_images[:500], test_labels[:500]


def run(subset, seed: int = 0, **kwargs):
    images, labels, test_images, test_labels = subset
    torch.manual_seed(seed)
    model = tiny_net()
    report = train_classifier(
        model, images, labels, epochs=3, lr=1e-2, batch_size=64, seed=seed, mean=0.286, std=0.353,
        eval_images=test_images, eval_labels=test_labels, progress=False, **kwargs,
    )  # fmt: skip
    return model, report


def test_learns_and_is_deterministic(subset) -> None:
    epochs_seen = []
    model, report = run(subset, on_epoch=lambda epoch, loss, acc: epochs_seen.append(epoch))
    assert epochs_seen == [1, 2, 3]
    assert report.epoch_losses[-1] < report.epoch_losses[0]
    assert report.epoch_accuracies[-1] > 0.6  # chance is 0.1
    assert not model.training
    again, _ = run(subset)
    for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    other, _ = run(subset, seed=1)
    assert not torch.equal(other[0].weight, model[0].weight)


def test_does_not_disturb_global_rng(subset) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run(subset, seed=123, augment=True)  # run() reseeds to build the net, then trains in a forked RNG
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), expected)


def test_augment_batch_shifts_and_flips() -> None:
    batch = torch.arange(2 * 28 * 28, dtype=torch.float32).reshape(2, 1, 28, 28)
    out = augment_batch(batch, torch.Generator().manual_seed(0))
    assert out.shape == batch.shape
    assert torch.equal(augment_batch(batch, torch.Generator().manual_seed(0)), out)
    assert not torch.equal(out, batch)
    # no shift: only flips, so each image is itself or its mirror
    flipped = augment_batch(batch, torch.Generator().manual_seed(3), shift=0)
    for image, original in zip(flipped, batch, strict=True):
        assert torch.equal(image, original) or torch.equal(image, original.flip(-1))


def test_to_tensor_and_input_checks(subset) -> None:
    images, labels, _, _ = subset
    tensor = to_tensor(images[:2], 0.5, 0.5)
    assert tensor.shape == (2, 1, 28, 28)
    assert torch.allclose(tensor, (torch.tensor(images[:2] / 255.0, dtype=torch.float32)[:, None] - 0.5) / 0.5)
    with pytest.raises(EdgekitError):
        to_tensor(np.zeros(5, dtype=np.uint8), 0.0, 1.0)
    with pytest.raises(EdgekitError, match="as many labels"):
        train_classifier(tiny_net(), images[:10], labels[:9], progress=False)
    model = tiny_net().eval()
    assert 0.0 <= accuracy(model, to_tensor(images[:50], 0.286, 0.353), labels[:50]) <= 1.0


def test_last_batch_of_one_is_dropped(subset) -> None:
    images, labels, _, _ = subset
    report = train_classifier(tiny_net(), images[:65], labels[:65], epochs=1, batch_size=64, progress=False)
    assert len(report.epoch_losses) == 1 and np.isfinite(report.final_loss)
