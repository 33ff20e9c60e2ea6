"""A small, deterministic classifier training loop for the models edgekit trains itself.

The zoo's Fashion-MNIST nets are trained on first use and later recipes (a stronger CEMA
foundation model, SoFT fine-tuning baselines) need the same loop, so it lives here once:
images in as numpy arrays, a fixed seed that fixes initialisation *and* data order, AdamW with
a one-cycle schedule (few epochs on a CPU must still converge), optional shift/flip
augmentation, and a rich progress bar.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from edgekit.errors import EdgekitError
from edgekit.progress import progress_bar


@dataclass
class TrainReport:
    epochs: int
    seconds: float  # wall clock
    final_loss: float
    cpu_seconds: float = 0.0  # process CPU time: less sensitive than wall clock to other load
    epoch_losses: list[float] = field(default_factory=list)
    epoch_accuracies: list[float] = field(default_factory=list)  # on eval arrays, when given


def to_tensor(images: np.ndarray, mean: float | tuple[float, ...], std: float | tuple[float, ...]) -> torch.Tensor:
    """uint8 [N,H,W] / [N,C,H,W] (0-255) or float in [0,1] -> normalised float32 [N,C,H,W]."""
    array = np.asarray(images)
    scale = 255.0 if array.dtype == np.uint8 else 1.0
    tensor = torch.as_tensor(array.astype(np.float32, copy=True)) / scale
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(1)
    if tensor.ndim != 4:
        raise EdgekitError(f"images must be [N,H,W] or [N,C,H,W], got shape {tuple(array.shape)}")
    mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
    return (tensor - mean_t) / std_t


def augment_batch(batch: torch.Tensor, generator: torch.Generator, shift: int = 2) -> torch.Tensor:
    """Random translation by up to ``shift`` pixels (edge padding) and random horizontal flip."""
    n, _, h, w = batch.shape
    padded = torch.nn.functional.pad(batch, (shift, shift, shift, shift), mode="replicate")
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, batch.shape[1], h, w + 2 * shift)
    shifted = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, batch.shape[1], h, w)
    shifted = shifted.gather(3, cols)
    flip = torch.rand(n, generator=generator) < 0.5
    shifted[flip] = shifted[flip].flip(-1)
    return shifted


@torch.no_grad()
def predict(model: torch.nn.Module, inputs: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Logits for every row of ``inputs`` in eval mode (batched, so 10k images fit in memory)."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)])
    model.train(was_training)
    return out


def accuracy(model: torch.nn.Module, inputs: torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on already-normalised ``inputs``."""
    predictions = predict(model, inputs).argmax(-1)
    return float((predictions == torch.tensor(np.asarray(labels))).float().mean())


def train_classifier(
    model: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int = 5,
    lr: float = 3e-3,
    batch_size: int = 128,
    seed: int = 0,
    augment: bool = False,
    mean: float | tuple[float, ...] = 0.0,
    std: float | tuple[float, ...] = 1.0,
    weight_decay: float = 5e-4,
    label_smoothing: float = 0.0,
    eval_images: np.ndarray | None = None,
    eval_labels: np.ndarray | None = None,
    progress: bool = True,
    description: str = "training",
    on_epoch: Callable[[int, float, float | None], None] | None = None,
) -> TrainReport:
    """Train ``model`` (in place) with cross-entropy; returns losses, timing and eval accuracy per epoch.

    ``seed`` fixes the data order and augmentation draws (and dropout, in a forked RNG);
    seed the model's *construction* yourself before building it. ``on_epoch(epoch, mean_loss,
    eval_accuracy_or_None)`` is called after every epoch, e.g. for logging.
    """
    if len(images) != len(labels) or len(images) < 2:
        raise EdgekitError(f"need as many labels as images, at least 2 (got {len(images)} and {len(labels)})")
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise EdgekitError("epochs and batch_size must be >= 1 and lr > 0")
    inputs = to_tensor(images, mean, std)
    targets = torch.tensor(np.asarray(labels), dtype=torch.long)
    eval_inputs = to_tensor(eval_images, mean, std) if eval_images is not None else None
    generator = torch.Generator().manual_seed(seed)
    # a last batch of one would break BatchNorm in training mode: drop it, keep any larger remainder
    steps_per_epoch = len(inputs) // batch_size + (1 if len(inputs) % batch_size > 1 else 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch, pct_start=0.25
    )
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    report = TrainReport(epochs=epochs, seconds=0.0, final_loss=float("nan"))
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.random.fork_rng(), progress_bar(progress) as bar:
        torch.manual_seed(seed)  # dropout draws; fork_rng gives the caller its RNG state back
        task = bar.add_task(description, total=epochs * steps_per_epoch, status="")
        for epoch in range(epochs):
            model.train()
            order = torch.randperm(len(inputs), generator=generator)
            running, seen = 0.0, 0
            for step in range(steps_per_epoch):
                index = order[step * batch_size : (step + 1) * batch_size]
                batch = inputs[index]
                if augment:
                    batch = augment_batch(batch, generator)
                loss = loss_fn(model(batch), targets[index])
                if not torch.isfinite(loss):
                    raise EdgekitError(f"{description}: loss became {loss.item()} at epoch {epoch + 1}; lower lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                running += loss.item() * len(index)
                seen += len(index)
                bar.update(task, advance=1, status=f"epoch {epoch + 1}/{epochs} loss {running / seen:.3f}")
            report.epoch_losses.append(running / seen)
            eval_accuracy = None
            if eval_inputs is not None and eval_labels is not None:
                eval_accuracy = accuracy(model, eval_inputs, eval_labels)
                report.epoch_accuracies.append(eval_accuracy)
            if on_epoch is not None:
                on_epoch(epoch + 1, report.epoch_losses[-1], eval_accuracy)
    model.eval()
    report.seconds = time.perf_counter() - start
    report.cpu_seconds = time.process_time() - cpu_start
    report.final_loss = report.epoch_losses[-1]
    return report
