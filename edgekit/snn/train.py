"""IIR: iterative initialisation and retraining, from T=5 down to T=1.

Each stage of the ladder (e.g. 5, 4, 3, 2, 1) trains the SNN at T timesteps with the surrogate
gradient, starting from the network the previous stage left (the first from the ANN
conversion). Adam, cross-entropy on the readout's accumulated potential, dropout on spikes, as in
the paper; leaks stay <= 1 and thresholds > 0 after every step. Within a stage the learning rate
anneals (cosine, to lr/20), because our stages are a few epochs long rather than the paper's many.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from rich.progress import Progress

from edgekit.errors import EdgekitError
from edgekit.progress import progress_bar
from edgekit.snn.network import SpikingNet


@dataclass
class Stage:
    timesteps: int
    epochs: float
    steps: int
    seconds: float
    train_loss: float
    accuracy: float  # on the evaluation tensors given to the trainer
    thresholds: list[float] = field(default_factory=list)
    leaks: list[float] = field(default_factory=list)


@torch.no_grad()
def accuracy(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    was_training = model.training
    model.eval()
    hits = 0
    for start in range(0, len(inputs), batch):
        hits += int((model(inputs[start : start + batch]).argmax(-1) == labels[start : start + batch]).sum())
    model.train(was_training)
    return hits / max(len(inputs), 1)


def train_stage(
    net: SpikingNet,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    timesteps: int,
    epochs: float,
    lr: float,
    batch: int,
    seed: int,
    eval_inputs: torch.Tensor,
    eval_labels: torch.Tensor,
    progress: Progress | None = None,
) -> Stage:
    """Train ``net`` in place at ``timesteps``; a fractional ``epochs`` trains on part of an epoch."""
    if timesteps < 1 or epochs <= 0 or lr <= 0 or batch < 1:
        raise EdgekitError("each ladder stage needs timesteps >= 1, epochs > 0, lr > 0 and batch >= 1")
    net.timesteps = timesteps
    generator = torch.Generator().manual_seed(seed + timesteps)
    steps = max(1, round(epochs * len(inputs) / batch))
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    # a short stage converges better when the rate anneals (cosine to lr/20) than at a fixed lr
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=lr / 20)
    loss_fn = torch.nn.CrossEntropyLoss()
    task = progress.add_task(f"IIR T={timesteps}", total=steps, status="") if progress else None
    start = time.perf_counter()
    running, seen = 0.0, 0
    order = torch.randperm(len(inputs), generator=generator)
    cursor = 0
    net.train()
    for _ in range(steps):
        if cursor + batch > len(order):
            order, cursor = torch.randperm(len(inputs), generator=generator), 0
        index = order[cursor : cursor + batch]
        cursor += batch
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))  # dropout masks
        loss = loss_fn(net(inputs[index]), labels[index])
        if not torch.isfinite(loss):
            raise EdgekitError(f"IIR T={timesteps}: loss became {loss.item()}; lower lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        net.constrain()
        running += loss.item() * len(index)
        seen += len(index)
        if progress is not None:
            progress.update(task, advance=1, status=f"loss {running / seen:.3f}")
    net.eval()
    acc = accuracy(net, eval_inputs, eval_labels)
    if progress is not None:
        progress.update(task, status=f"loss {running / seen:.3f}  accuracy {acc:.2%}")
    return Stage(
        timesteps=timesteps,
        epochs=epochs,
        steps=steps,
        seconds=time.perf_counter() - start,
        train_loss=running / seen,
        accuracy=acc,
        thresholds=[lif.threshold.item() for lif in net.lif_layers],
        leaks=[lif.leak.item() for lif in net.lif_layers],
    )


def stage_epochs(ladder: list[int], epochs: float | list[float]) -> list[float]:
    """One epoch budget per stage: a single value for all stages, or one per stage."""
    values = [float(epochs)] if isinstance(epochs, int | float) else [float(e) for e in epochs]
    if len(values) == 1:
        values = values * len(ladder)
    if len(values) != len(ladder) or any(v <= 0 for v in values):
        raise EdgekitError(f"epochs must be one positive value or one per ladder stage ({len(ladder)}), got {epochs}")
    return values


def iir(
    net: SpikingNet,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    ladder: list[int],
    epochs: float | list[float],
    lr: float,
    batch: int,
    eval_inputs: torch.Tensor,
    eval_labels: torch.Tensor,
    seed: int = 0,
    show_progress: bool = True,
    keep: tuple[int, ...] = (),
) -> tuple[list[Stage], dict[int, SpikingNet]]:
    """Run the ladder in place on ``net``; returns each stage's record and copies of the stages in ``keep``."""
    if not ladder or any(t < 1 for t in ladder) or list(ladder) != sorted(ladder, reverse=True):
        raise EdgekitError(f"the timestep ladder must be positive and decreasing, e.g. 5,4,3,2,1 (got {ladder})")
    per_stage = stage_epochs(ladder, epochs)
    stages: list[Stage] = []
    kept: dict[int, SpikingNet] = {}
    for timesteps, stage_epoch in zip(ladder, per_stage, strict=True):
        with progress_bar(show_progress) as progress:  # one bar per stage: a log gets a line as each ends
            stages.append(
                train_stage(
                    net, inputs, labels, timesteps, stage_epoch, lr, batch, seed, eval_inputs, eval_labels, progress
                )
            )
        if timesteps in keep:
            kept[timesteps] = copy.deepcopy(net).eval()
    return stages, kept
