"""MobileQuant's end-to-end optimisation: all blocks at once, MSE on the final hidden state.

Unlike OmniQuant's block-by-block reconstruction, every learnable parameter (transform scales,
clipping logits, activation scales/offsets) is trained jointly against the float model's final
(normed) hidden state. AdamW, one parameter group per kind, each on its own cosine schedule.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from edgekit.progress import progress_bar
from edgekit.quantize.convnet import QuantConvNet
from edgekit.quantize.encoder import QuantEncoder
from edgekit.quantize.llama import QuantLlama

# The simulated models share the interface this module uses (act/weight quants, transforms,
# ``set_quant``, ``hidden_state``); a LLaMA batch is input_ids, an encoder's or a conv net's batch
# its input dict.
Simulated = QuantLlama | QuantEncoder | QuantConvNet
Batch = torch.Tensor | dict[str, torch.Tensor]


@dataclass(frozen=True)
class Schedule:
    """Start and end learning rates (cosine decay between them) per parameter group.

    ``log_scales``: the transform scales and activation scales are learned as their logarithms,
    so the ``transform`` and ``range`` rates are relative steps, the same for a scale of 1e-3 and
    of 30 (in plain parameters Adam moves every scale by about the rate, whatever its size); the
    zero points then learn at ``offset`` (integer units).
    """

    transform: tuple[float, float] = (1e-3, 1e-4)
    clip: tuple[float, float] = (1e-2, 1e-3)
    range: tuple[float, float] = (1e-6, 1e-7)
    log_scales: bool = False
    offset: tuple[float, float] = (0.0, 0.0)


class _Exp(nn.Module):
    """Parametrization ``value = exp(u)`` (scales are positive: SmoothQuant's and MinMax's are)."""

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return torch.exp(u)

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        return torch.log(value.abs().clamp_min(1e-12))


def _parameter_groups(model: Simulated, schedule: Schedule) -> list[tuple[list[nn.Parameter], tuple[float, float]]]:
    if schedule.log_scales:
        scaled = [(t, name) for t in model.transforms for name, _ in list(t.named_parameters(recurse=False))]
        scaled += [(q, "scale") for q in model.act_quants()]
        for module, name in scaled:
            parametrize.register_parametrization(module, name, _Exp())
        transforms = [t.parametrizations[name].original for t in model.transforms for name in t.parametrizations]
        ranges = [q.parametrizations.scale.original for q in model.act_quants()]
        offsets = [q.offset for q in model.act_quants()]
        return [
            (transforms, schedule.transform),
            (model.clip_parameters(), schedule.clip),
            (ranges, schedule.range),
            (offsets, schedule.offset),
        ]
    # The range learning rates are for 8-bit sites; a 16-bit site's scale is 257x finer, so its
    # rate is scaled alike (as if learning the scale in 8-bit units).
    ranges = {8: [], 16: []}
    for quant in model.act_quants():
        ranges[quant.bits] += [quant.scale, quant.offset]
    fine = 255.0 / 65535.0
    return [
        (model.transform_parameters(), schedule.transform),
        (model.clip_parameters(), schedule.clip),
        (ranges[8], schedule.range),
        (ranges[16], (schedule.range[0] * fine, schedule.range[1] * fine)),
    ]


def _plain_parameters(model: Simulated) -> None:
    """Back to plain parameters holding the learned values (what fold and export read)."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)


def _cosine(start: float, end: float, total: int):
    def factor(step: int) -> float:
        progress = min(step, total) / max(total, 1)
        return (end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))) / start

    return factor


@torch.no_grad()
def float_targets(model: Simulated, batches: Sequence[Batch]) -> list[torch.Tensor]:
    model.set_quant(weights=False, acts=False)
    return [model.hidden_state(batch) for batch in batches]


def optimise(
    model: Simulated,
    batches: Sequence[Batch],
    targets: Sequence[torch.Tensor],
    epochs: int,
    schedule: Schedule = Schedule(),
    show_progress: bool = True,
    max_grad_norm: float = 0.0,
) -> dict[str, object]:
    """Train the simulated model in place; returns the loss history, skipped steps and timing.

    A step whose gradient is not finite is skipped (and counted) instead of writing NaN into every
    parameter: with an 8-bit residual stream (int8-only on SmolLM2, whose residual range is ~25,000)
    most tokens' residual rounds to zero, RMSNorm's backward through 30 such layers overflows
    float32 (activation-scale gradients ~1e36 at the first step, NaN at the second).
    ``max_grad_norm`` > 0 clips the global gradient norm first.
    """
    model.set_quant(weights=True, acts=True)
    try:
        return _train(model, batches, targets, epochs, _parameter_groups(model, schedule), show_progress, max_grad_norm)
    finally:
        _plain_parameters(model)
        for p in model.parameters():
            p.requires_grad_(False)


def _train(
    model: Simulated,
    batches: Sequence[Batch],
    targets: Sequence[torch.Tensor],
    epochs: int,
    parameter_groups: list[tuple[list[nn.Parameter], tuple[float, float]]],
    show_progress: bool,
    max_grad_norm: float,
) -> dict[str, object]:
    groups = []
    for params, (start, end) in parameter_groups:
        if params and start > 0:
            for p in params:
                p.requires_grad_(True)
            groups.append(({"params": params, "lr": start}, _cosine(start, end, epochs * len(batches))))
    history: list[float] = []
    started = time.perf_counter()
    if not groups or epochs <= 0 or not batches:
        return {"losses": history, "steps": 0, "skipped": 0, "seconds": 0.0}
    trained = [p for group, _ in groups for p in group["params"]]
    skipped = 0
    optimiser = torch.optim.AdamW([g for g, _ in groups], weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, [f for _, f in groups])
    total = epochs * len(batches)
    running = None
    with progress_bar(show_progress) as progress:
        task = progress.add_task("MobileQuant", total=total, status="")
        for epoch in range(epochs):
            for batch, target in zip(batches, targets, strict=True):
                loss = torch.nn.functional.mse_loss(model.hidden_state(batch), target)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise RuntimeError(f"MobileQuant loss became {value} at epoch {epoch}")
                norm = torch.nn.utils.clip_grad_norm_(trained, max_grad_norm if max_grad_norm > 0 else math.inf)
                if torch.isfinite(norm):
                    optimiser.step()
                else:
                    skipped += 1
                scheduler.step()
                history.append(value)
                running = value if running is None else 0.9 * running + 0.1 * value
                status = f"epoch {epoch + 1}/{epochs} loss {running:.4g}" + (f" skipped {skipped}" if skipped else "")
                progress.update(task, advance=1, status=status)
    return {"losses": history, "steps": len(history), "skipped": skipped, "seconds": time.perf_counter() - started}


@torch.no_grad()
def hidden_mse(model: Simulated, batches: Sequence[Batch], targets: Sequence[torch.Tensor]) -> float:
    """Mean MSE of the simulated (fully quantized) model's final hidden state against the float one."""
    model.set_quant(weights=True, acts=True)
    losses = [
        float(torch.nn.functional.mse_loss(model.hidden_state(b), t)) for b, t in zip(batches, targets, strict=True)
    ]
    return sum(losses) / max(len(losses), 1)
