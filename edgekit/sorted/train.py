"""The sorted fine-tuning loop (SoFT), and plain SFT as the same loop with only the full depth.

Every step back-propagates the mean of all configured sub-models' LM losses (summed over depths,
not sampled, as in Sorted LLaMA), computed from one pass through the layers. A checkpoint (model,
optimiser, schedule, data position) is written atomically every ``save_every`` steps, so an
interrupted run resumes where it stopped with the same result it would have had.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgekit.errors import EdgekitError
from edgekit.models.llama import CausalLMWithCache
from edgekit.progress import progress_bar
from edgekit.sorted.data import batches
from edgekit.sorted.model import check_depths, default_depths, sorted_loss

STATE_FILE = "state.pt"
WEIGHTS_FILE = "model.pt"
HISTORY_FILE = "training.json"


@dataclass
class TrainConfig:
    """Budget and method settings. ``depths=None`` means :func:`default_depths` (12..30 step 3).

    The default budget (60 steps × 4 × 128 tokens) is sized from SoFT steps measured on SmolLM2
    here: 69 s per 512-token step with 2 threads on the 2-core CPU while other jobs ran (load ~3.5),
    so about 30-40 min when the machine is quiet. An estimate, not a timing of the full default run.
    """

    depths: list[int] | None = None
    steps: int = 60
    seq_len: int = 128
    batch: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.1  # cosine decay ends at lr × this
    warmup: int = 4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    data: str = "wikipedia"  # or the path of an Alpaca-format JSONL file
    seed: int = 0
    save_every: int = 10
    holdout_tokens: int = 0  # Wikipedia: tail tokens of the training split never trained on (calibration)
    device: str = "cpu"  # where training runs: "cpu", "cuda", "cuda:1", ...

    def resolved_depths(self, num_layers: int) -> list[int]:
        return check_depths(self.depths or default_depths(num_layers), num_layers)

    def check(self) -> None:
        for name in ("steps", "seq_len", "batch", "grad_accum", "save_every"):
            if getattr(self, name) < 1:
                raise EdgekitError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise EdgekitError("seq_len must be at least 2 (a next-token loss needs two tokens)")
        if not self.lr > 0:
            raise EdgekitError(f"lr must be positive, got {self.lr}")
        if self.holdout_tokens < 0:
            raise EdgekitError(f"holdout_tokens must be at least 0, got {self.holdout_tokens}")
        self.torch_device()

    def torch_device(self) -> torch.device:
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise EdgekitError(f"device {self.device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise EdgekitError(f"device {self.device}: no CUDA GPU is available here")
        if device.type not in ("cpu", "cuda"):
            raise EdgekitError(f"device {self.device}: training runs on cpu or cuda")
        return device


@dataclass
class TrainResult:
    depths: list[int]
    steps: int
    seconds: float  # wall time of this process's training steps (not of earlier, resumed ones)
    history: list[dict[str, Any]] = field(default_factory=list)  # per step: loss, per-depth losses, lr

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to ``lr × min_lr_ratio`` at the last step."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    span = max(1, config.steps - config.warmup)
    progress = min(1.0, (step - config.warmup) / span)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _status(loss: float, per_depth: dict[int, float]) -> str:
    return f"loss {loss:.3f} | " + " ".join(f"{depth}:{value:.2f}" for depth, value in sorted(per_depth.items()))


def train(
    model: CausalLMWithCache,
    tokenizer,
    config: TrainConfig,
    work_dir: Path,
    *,
    separator_id: int | None = None,
    description: str = "sorted fine-tuning",
    data: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> TrainResult:
    """Fine-tune ``model`` in place (all parameters), resuming from ``work_dir/state.pt`` if present.

    ``data`` overrides ``config.data`` (tests pass in-memory batches). The resume state records
    the settings; resuming with different ones is refused rather than silently mixed. The model is
    moved to ``config.device`` and left there; on a GPU the forward and backward passes run in
    bfloat16 autocast (fp32 weights and optimiser state), on the CPU in fp32.
    """
    config.check()
    depths = config.resolved_depths(model.num_layers)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    state_path = work_dir / STATE_FILE
    hf_model = model.hf_model
    device = config.torch_device()
    model.to(device)
    parameters = [p for p in hf_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))
    settings = dataclasses.asdict(config) | {"depths": depths}
    start_step, history = 0, []
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if state["settings"] != settings:
            raise EdgekitError(f"{state_path} was written with other settings; remove it or use the same ones")
        hf_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, history = int(state["step"]), list(state["history"])
        torch.set_rng_state(state["torch_rng"])
    else:
        torch.manual_seed(config.seed)
    stream = (
        data
        if data is not None
        else batches(
            config.data, tokenizer, config.batch, config.seq_len, config.seed, separator_id, config.holdout_tokens
        )
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for _ in range(start_step * config.grad_accum):  # the data position of a resumed run
        next(stream)

    hf_model.train()
    started = time.perf_counter()
    with progress_bar() as progress:
        task = progress.add_task(
            description, total=config.steps, completed=start_step, status="resumed" if start_step else ""
        )
        for step in range(start_step, config.steps):
            rate = learning_rate(config, step)
            for group in optimizer.param_groups:
                group["lr"] = rate
            sums: dict[int, float] = dict.fromkeys(depths, 0.0)
            total = 0.0
            for _ in range(config.grad_accum):
                ids, labels = next(stream)
                with autocast:
                    loss, per_depth = sorted_loss(model, ids.to(device), labels.to(device), depths)
                (loss / config.grad_accum).backward()
                total += float(loss.detach()) / config.grad_accum
                for depth, value in per_depth.items():
                    sums[depth] += value / config.grad_accum
            if not math.isfinite(total):
                raise EdgekitError(f"training diverged at step {step} (loss {total}); lower lr")
            torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            history.append(
                {"step": step + 1, "lr": rate, "loss": total, "per_depth": {str(k): v for k, v in sums.items()}}
            )
            progress.update(task, advance=1, status=_status(total, sums))
            done = step + 1
            if done % config.save_every == 0 or done == config.steps:
                _save_atomic(
                    {
                        "settings": settings,
                        "step": done,
                        "model": hf_model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "history": history,
                        "torch_rng": torch.get_rng_state(),
                    },
                    state_path,
                )
    hf_model.eval()
    return TrainResult(depths=depths, steps=config.steps, seconds=time.perf_counter() - started, history=history)


def save_weights(model: CausalLMWithCache, result: TrainResult, directory: Path) -> None:
    """The trained weights and the loss history: what a finished run leaves (no optimiser state)."""
    torch.save(model.hf_model.state_dict(), directory / WEIGHTS_FILE)
    (directory / HISTORY_FILE).write_text(json.dumps(result.as_dict()))


def load_weights(model: CausalLMWithCache, directory: Path) -> TrainResult:
    """Load weights saved by :func:`save_weights` into ``model``; returns the recorded run."""
    state = torch.load(Path(directory) / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    model.hf_model.load_state_dict(state)
    model.hf_model.eval()
    return TrainResult(**json.loads((Path(directory) / HISTORY_FILE).read_text()))
