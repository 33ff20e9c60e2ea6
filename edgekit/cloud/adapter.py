"""CEMA's cloud half: adapt the foundation model, distil the edge student's normalization layers.

Per device, on the reference code's schedule (Chen et al., ICLR'24; chenyaofo/CEMA):

1. per ``cloud_batch`` (32) newly uploaded samples, the foundation model (teacher) adapts by
   entropy minimisation on them, each weighted ``1 / exp(E - E_max)`` and only those with
   ``E < E_max`` (``E_max = 0.4 ln C``), updating only its normalization affine parameters
   (Tent/EATA style, batch statistics);
2. then the student's normalization affine parameters take one distillation step on the new batch
   together with ``replay_batches x replay_batch`` samples drawn from the device's FIFO replay
   buffer, with ``alpha * H_w(student) + beta * KL_w(teacher || student) + gamma * CE_w(student,
   teacher argmax)``, ``H`` weighted by ``1 / exp(E_student - E_max)`` and KL, CE by
   ``1 / exp(E_teacher - E_max)``;
3. an edge upload that brings fewer than ``student_steps_per_upload`` batches gets replay-only
   distillation steps to make up the difference (the reference: one, when it completes none).

Student and edge both normalise with the statistics of the batch in hand (as the reference code's
Tent-style models do), so the edge needs only the distilled affine ``weight`` and ``bias`` of
every norm layer.
"""

from __future__ import annotations

import copy
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)


@dataclass
class CemaConfig:
    """Defaults are the paper's and the reference code's (``conf/cema.conf``), except the learning
    rates, which are tuned for this 10-class, batch-statistics setting (not ImageNet's SGD 2.5e-3)."""

    num_classes: int = 10
    alpha: float = 3.0
    beta: float = 3.0
    gamma: float = 1.0
    e_max_factor: float = 0.4
    teacher_lr: float = 1e-3
    student_lr: float = 3e-3
    replay_size: int = 10_000
    replay_batches: int = 3
    replay_batch: int = 32
    cloud_batch: int = 32  # new samples per teacher/student step (the reference's batch_size)
    # buffered samples before replay-only steps start. The reference waits for 256, 0.5% of its
    # 50,000-image stream per corruption; in a 2,048-image stream 256 selected samples take half
    # the stream to collect, so the student idles. 32 (one cloud batch) gained 0.4 points on
    # held-out severity 4 (bench/cema.py --severity 4, six corruptions), chosen there, not on 5.
    replay_only_after: int = 32
    # student steps per edge upload, at least: the steps on new samples first, replay-only steps to
    # fill. The reference takes one replay-only step when an upload completes no batch, so an edge
    # uploading a third of its stream gave the student half the steps that uploading everything
    # does (a 64-sample upload is two cloud batches). 2 gives every upload the steps a full one
    # would: held-out severity 4 (six corruptions) 79.95% -> 80.62% against upload-everything's
    # 81.36% (3 gave 80.97 against 81.93: both rise, the gap stays); chosen there, not on 5.
    student_steps_per_upload: int = 2
    bn_momentum: float = 0.1

    @property
    def e_max(self) -> float:
        return self.e_max_factor * math.log(self.num_classes)


class PixelInput(nn.Module):
    """``net((x - mean) / std)``: a model that takes raw pixels in [0, 1].

    CEMA's edge uploads the frames it sees and the cloud's two models each bring their own input
    normalization (the zoo's ``fmnist-cnn`` was trained on standardised pixels, the foundation model
    on raw ones), so every CEMA model, edge graph included, is put in pixel space by this wrapper.
    """

    def __init__(self, net: nn.Module, mean: object, std: object) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def pixel_input(bundle) -> nn.Module:  # ModelBundle (not imported: the models package imports torch trainers)
    """The bundle's module taking pixels in [0, 1]: wrapped in :class:`PixelInput` when the bundle
    records an input normalization (``meta["input_mean"]``/``["input_std"]``), else as it is."""
    mean, std = bundle.meta.get("input_mean"), bundle.meta.get("input_std")
    if mean is None or std is None:
        return bundle.module
    return PixelInput(bundle.module, mean, std).eval()


def norm_parameter_names(module: nn.Module, statistics: bool = False) -> dict[str, str]:
    """``state_dict name -> kind`` of every normalization layer's affine params (and BN statistics)."""
    names: dict[str, str] = {}
    for prefix, layer in module.named_modules():
        if not isinstance(layer, NORM_TYPES):
            continue
        base = f"{prefix}." if prefix else ""
        if getattr(layer, "weight", None) is not None:
            names[base + "weight"] = "scale"
            names[base + "bias"] = "bias"
        if statistics and isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.track_running_stats:
            names[base + "running_mean"] = "mean"
            names[base + "running_var"] = "var"
    return names


def configure_for_adaptation(module: nn.Module, momentum: float) -> list[nn.Parameter]:
    """Freeze everything but the norm affine params; norm layers use batch statistics; no dropout."""
    module.train()
    module.requires_grad_(False)
    params: list[nn.Parameter] = []
    for layer in module.modules():
        if isinstance(layer, nn.Dropout):
            layer.eval()
        if isinstance(layer, NORM_TYPES) and getattr(layer, "weight", None) is not None:
            layer.weight.requires_grad_(True)
            layer.bias.requires_grad_(True)
            params += [layer.weight, layer.bias]
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.momentum = momentum
    return params


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


class ReplayBuffer:
    """In-memory FIFO replay buffer (the service keeps its buffer in SQLite instead)."""

    def __init__(self, size: int, seed: int = 0) -> None:
        self.items: deque[np.ndarray] = deque(maxlen=size)
        self.rng = np.random.default_rng(seed)

    def add(self, x: np.ndarray) -> None:
        self.items.extend(np.asarray(x, dtype=np.float32))

    def sample(self, count: int) -> np.ndarray:
        if not self.items:
            return np.zeros((0,), np.float32)
        index = self.rng.choice(len(self.items), size=min(count, len(self.items)), replace=False)
        return np.stack([self.items[i] for i in index])


class DeviceAdapter:
    """One device's adapted teacher and distilled student."""

    def __init__(self, teacher: nn.Module, student: nn.Module, config: CemaConfig, seed: int = 0) -> None:
        self.config = config
        self.teacher = copy.deepcopy(teacher)
        self.student = copy.deepcopy(student)
        torch.manual_seed(seed)
        self.teacher_params = configure_for_adaptation(self.teacher, config.bn_momentum)
        self.student_params = configure_for_adaptation(self.student, config.bn_momentum)
        self.teacher_opt = torch.optim.SGD(self.teacher_params, lr=config.teacher_lr, momentum=0.9)
        self.student_opt = torch.optim.Adam(self.student_params, lr=config.student_lr)
        self.names = norm_parameter_names(self.student)
        self.steps = 0

    def adapt_teacher(self, x: torch.Tensor) -> dict[str, float]:
        logits = self.teacher(x)
        ent = softmax_entropy(logits)
        reliable = ent < self.config.e_max
        if reliable.any():
            weight = torch.exp(self.config.e_max - ent[reliable].detach())  # = 1 / exp(E - E_max)
            loss = (weight * ent[reliable]).mean()
            self.teacher_opt.zero_grad()
            loss.backward()
            self.teacher_opt.step()
        return {
            "teacher_entropy": float(ent.detach().mean()),
            "teacher_reliable": float(reliable.float().mean()),
        }

    def distil(self, x: torch.Tensor) -> float:
        """One student step on ``x``: ``alpha * H_w + beta * KL_w + gamma * CE_w`` (reference loss).

        The entropy term is weighted by the student's own ``1/exp(E_s - E_max)``, the KL and CE terms
        by the teacher's ``1/exp(E_t - E_max)``, as the reference's ``TTADistillationLoss`` does.
        """
        c = self.config
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        t_log_p = teacher_logits.log_softmax(1)
        t_ent = -(t_log_p.exp() * t_log_p).sum(1)
        t_weight = torch.exp(c.e_max - t_ent)  # = 1 / exp(E_teacher - E_max)
        s_logits = self.student(x)
        s_log_p = s_logits.log_softmax(1)
        s_ent = -(s_log_p.exp() * s_log_p).sum(1)
        s_weight = torch.exp(c.e_max - s_ent.detach())
        kl = (t_log_p.exp() * (t_log_p - s_log_p)).sum(1)
        ce = nn.functional.nll_loss(s_log_p, teacher_logits.argmax(1), reduction="none")
        loss = c.alpha * (s_weight * s_ent).mean() + (t_weight * (c.beta * kl + c.gamma * ce)).mean()
        self.student_opt.zero_grad()
        loss.backward()
        self.student_opt.step()
        return float(loss.detach())

    def step(self, x_new: np.ndarray, replay: Callable[[int], np.ndarray]) -> dict[str, float]:
        """One CEMA update from a batch of new samples; ``replay(n)`` draws up to n buffered samples.

        As in the reference code: the teacher adapts on the new batch, then the student takes one
        distillation step on the new batch together with ``replay_batches * replay_batch`` replayed
        samples (one forward, so its batch statistics cover new and old samples alike).
        """
        x = torch.from_numpy(np.asarray(x_new, dtype=np.float32))
        metrics = self.adapt_teacher(x) if len(x) > 1 else {}
        old = replay(self.config.replay_batches * self.config.replay_batch)
        if len(old) > 0:
            x = torch.cat([x, torch.from_numpy(np.asarray(old, dtype=np.float32))])
        metrics["student_loss"] = self.distil(x) if len(x) > 1 else float("nan")
        self.steps += 1
        return metrics

    def replay_step(self, replay: Callable[[int], np.ndarray]) -> dict[str, float]:
        """A distillation step on replayed samples only, ``(replay_batches + 1) * replay_batch`` of them.

        The reference code takes one whenever an edge batch brings too few uploads for a cloud batch
        (once the buffer holds ``replay_only_after`` samples); here they make up every upload's
        ``student_steps_per_upload``, so the student keeps learning at the pace of the stream however
        few samples the edge selects.
        """
        old = replay((self.config.replay_batches + 1) * self.config.replay_batch)
        if len(old) < 2:
            return {"student_loss": float("nan")}
        self.steps += 1
        return {"student_loss": self.distil(torch.from_numpy(np.asarray(old, dtype=np.float32)))}

    def student_arrays(self) -> dict[str, np.ndarray]:
        """The edge's adaptable parameter set (norm affine params and BN statistics), float32 numpy."""
        state = self.student.state_dict()
        return {name: state[name].detach().cpu().numpy().astype(np.float32).copy() for name in self.names}

    # -- persistence: what a restarted service needs to continue this device ----------------------
    def state(self) -> dict[str, np.ndarray]:
        arrays = {f"student.{k}": v for k, v in self.student_arrays().items()}
        student_state = self.student.state_dict()
        for name in norm_parameter_names(self.student, statistics=True):
            arrays[f"student.{name}"] = student_state[name].detach().cpu().numpy().astype(np.float32).copy()
        teacher_state = self.teacher.state_dict()
        for name in norm_parameter_names(self.teacher, statistics=True):
            arrays[f"teacher.{name}"] = teacher_state[name].detach().cpu().numpy().astype(np.float32).copy()
        return arrays

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        for prefix, module in (("student.", self.student), ("teacher.", self.teacher)):
            update = {
                k[len(prefix) :]: torch.from_numpy(np.array(v)) for k, v in arrays.items() if k.startswith(prefix)
            }
            state = module.state_dict()
            for name, value in update.items():
                state[name].copy_(value.to(state[name].dtype))


def predict_eval(module: nn.Module, x: np.ndarray, batch: int = 512) -> np.ndarray:
    """Eval-mode logits (for accuracy checks), in chunks."""
    module = module.eval()
    with torch.no_grad():
        return np.concatenate([module(torch.from_numpy(x[i : i + batch])).numpy() for i in range(0, len(x), batch)])
