"""Spiking networks: the trainable simulator and its export form, unrolled over T.

A network is a chain of ops: weight layers (``Conv2d``/``Linear`` with BatchNorm already folded
in), :class:`~edgekit.snn.neuron.LIF` layers, shape ops that commute with spiking (pooling,
flatten), and for residual networks a :class:`Fork` (keep this tensor) and a :class:`Join` (add the
kept tensor, through its shortcut, to the block's output before the next LIF layer). A ResNet
stays a flat chain that way, so every per-op mechanism (state, spike maps, op counts, export)
indexes it the same. The input is encoded directly (the analog image drives the first layer at every step,
so its current is computed once), and the last weight layer is the readout: it integrates
its input without spiking, and its potential divided by T is the logits (the same scale as the
ANN's at every T, so one stage of the ladder initialises the next cleanly).
"""

from __future__ import annotations

import keyword

import torch
from torch import nn
from torch.nn import functional as F

from edgekit.snn.neuron import LIF

WEIGHT_OPS = (nn.Conv2d, nn.Linear)


class Fork(nn.Module):
    """Keeps the tensor passing here (a residual block's input) in ``slot`` for a later :class:`Join`."""

    def __init__(self, slot: int) -> None:
        super().__init__()
        self.slot = int(slot)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return f"slot={self.slot}"


class Join(nn.Module):
    """The residual add: the block's output plus the kept tensor through the shortcut.

    The shortcut is either empty (identity) or pooling plus one conv/linear (BatchNorm folded, the
    ResNet downsample). In a spiking net the kept tensor is spikes; an identity shortcut then scales
    them by ``scale`` (what one spike stands for, V_th of the layer that fired them, trainable),
    while a conv shortcut carries that factor in its weights, so its input stays binary.
    """

    def __init__(self, slot: int, shortcut: list[nn.Module], scale: float | None = None) -> None:
        super().__init__()
        self.slot = int(slot)
        self.shortcut = nn.ModuleList(shortcut)
        self.scale = None if scale is None else nn.Parameter(torch.tensor(float(scale)))

    def branch(self, kept: torch.Tensor, note=None) -> torch.Tensor:
        """The shortcut applied to ``kept``; ``note(op, inputs, output, area)`` sees its weight op."""
        h, area = kept, 1.0
        for op in self.shortcut:
            out = op(h)
            if isinstance(op, WEIGHT_OPS):
                if note is not None:
                    note(op, h, out, area)
                area = 1.0
            elif is_average_pool(op):
                area *= pool_area(op, h, out)
            h = out
        return h * self.scale if self.scale is not None else h

    def extra_repr(self) -> str:
        return f"slot={self.slot}" + ("" if self.scale is None else f", scale={self.scale.item():.4g}")


def first_weight_index(ops: nn.ModuleList | list[nn.Module]) -> int:
    return next(i for i, op in enumerate(ops) if isinstance(op, WEIGHT_OPS))


class SpikingNet(nn.Module):
    """The SNN as it trains: ``forward(x)`` runs ``timesteps`` steps and returns logits.

    ``dropout`` applies to spikes in training with one mask per forward, shared by all timesteps
    (a neuron is dropped for the whole presentation, as in the reference code).
    """

    def __init__(self, ops: list[nn.Module], timesteps: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.ops = nn.ModuleList(ops)
        self.timesteps = int(timesteps)
        self.dropout = float(dropout)
        self.record: list[dict] | None = None  # set to [] to collect per-op statistics (energy)

    @property
    def lif_layers(self) -> list[LIF]:
        return [op for op in self.ops if isinstance(op, LIF)]

    def constrain(self) -> None:
        for lif in self.lif_layers:
            lif.constrain()

    def forward(self, x: torch.Tensor, return_spikes: bool = False):
        steps = self.timesteps
        first = first_weight_index(self.ops)
        states: dict[int, torch.Tensor | None] = {}
        kept: dict[int, torch.Tensor] = {}
        masks: dict[int, torch.Tensor] = {}
        spike_maps: dict[int, list[torch.Tensor]] = {}
        cached: torch.Tensor | None = None
        total: torch.Tensor | None = None
        for t in range(steps):
            h = x
            area = 1.0  # how many spikes an input value of 1 stands for (average pooling since the last LIF)
            for i, op in enumerate(self.ops):
                if isinstance(op, LIF):
                    h, states[i] = op.step(h, states.get(i))
                    area = 1.0
                    self._note(i, op, None, h, t, area)
                    if return_spikes:
                        spike_maps.setdefault(i, []).append(h)
                    if self.training and self.dropout > 0:
                        if i not in masks:
                            keep = 1.0 - self.dropout
                            # rand < keep is a Bernoulli(keep) draw at half the cost of torch.bernoulli
                            masks[i] = torch.rand_like(h).lt_(keep).div_(keep)
                        h = h * masks[i]
                elif i <= first and cached is not None:
                    # the analog input drives the first layer identically every step: computed once
                    h = cached if i == first else h
                elif isinstance(op, Fork):
                    kept[op.slot] = h
                elif isinstance(op, Join):
                    h = h + op.branch(kept[op.slot], self._shortcut_note(i, t))
                else:
                    out = op(h)
                    if isinstance(op, WEIGHT_OPS):
                        self._note(i, op, h, out, t, area)
                    elif is_average_pool(op):
                        area *= pool_area(op, h, out)
                    if i == first:
                        cached = out
                    h = out
            total = h if total is None else total + h
        logits = total / steps if steps > 1 else total
        if return_spikes:
            return logits, [torch.stack(spike_maps[i]) for i in sorted(spike_maps)]
        return logits

    def _shortcut_note(self, index: int, t: int):
        """The op-count hook for a :class:`Join`'s shortcut weight op, counted under the Join's index."""
        if self.record is None:
            return None
        return lambda op, inputs, output, area: self._note(index, op, inputs, output, t, area)

    def _note(
        self, index: int, op: nn.Module, inputs: torch.Tensor | None, output: torch.Tensor, t: int, area: float
    ) -> None:
        """Per-op statistics for the op/energy count: what went in (binary or analog) and how sparse."""
        if self.record is None:
            return
        with torch.no_grad():
            entry = {"index": index, "step": t, "kind": type(op).__name__, "batch": output.shape[0]}
            if isinstance(op, LIF):
                entry["neurons"] = output[0].numel()
                entry["spike_rate"] = float(output.mean())
            else:
                entry["macs"] = macs_per_sample(op, output)
                # spike counts behind each input: integers when the input is (average-pooled) spikes
                counts = inputs * area
                integral = bool(((counts - counts.round()).abs() < 1e-3).all())
                entry["spike_input"] = integral and bool((inputs >= 0).all())
                entry["spikes_per_input"] = float(counts.mean())  # events per input position
                entry["input_density"] = float((inputs != 0).float().mean())
            self.record.append(entry)


def is_average_pool(op: nn.Module) -> bool:
    """Average pooling is linear, so spikes through it are still events (each worth 1/area)."""
    return isinstance(op, nn.AvgPool2d | nn.AdaptiveAvgPool2d) or getattr(op, "fn", None) in (
        F.avg_pool2d,
        F.adaptive_avg_pool2d,
    )


def pool_area(op: nn.Module, inputs: torch.Tensor, output: torch.Tensor) -> float:
    """How many inputs one average-pooled value averages (the kernel, when the op has one)."""
    kernel = getattr(op, "kernel_size", None) or (op.args[0] if getattr(op, "args", None) else None)
    if kernel is None or isinstance(op, nn.AdaptiveAvgPool2d) or getattr(op, "fn", None) is F.adaptive_avg_pool2d:
        return inputs[0, 0].numel() / output[0, 0].numel()
    kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
    return float(kernel[0] * kernel[1])


def macs_per_sample(op: nn.Module, output: torch.Tensor) -> int:
    """Multiply-accumulates of one sample through a conv/linear (its synaptic operations)."""
    if isinstance(op, nn.Conv2d):
        kh, kw = op.kernel_size
        return int(output[0].numel() * (op.in_channels // op.groups) * kh * kw)
    if isinstance(op, nn.Linear):
        return int(output[0].numel() // op.out_features * op.in_features * op.out_features)
    raise TypeError(f"not a weight op: {type(op).__name__}")


class UnrolledSNN(nn.Module):
    """The export form: T timesteps written out as plain conv/linear/add/mul/compare ops.

    Spikes are ``(u > V_th).float()`` (thresholded binary tensors); thresholds and leaks are
    constants. Work that is provably dead is left out of the graph: no leak on the resting state
    of step 1, no reset after the last step, a leak of exactly 1 is not multiplied. At T=1 a
    spiking layer is conv + compare + cast. ``return_spikes`` adds every LIF layer's spike map
    (stacked over T, [T, B, ...]) as extra outputs, for verification.
    """

    def __init__(self, net: SpikingNet, timesteps: int | None = None, return_spikes: bool = False) -> None:
        super().__init__()
        self.timesteps = int(timesteps or net.timesteps)
        self.return_spikes = return_spikes
        self.first = first_weight_index(net.ops)
        ops, kinds = [], []
        for index, op in enumerate(net.ops):
            if isinstance(op, LIF):
                ops.append(nn.Identity())
                kinds.append("lif")
                self.register_buffer(f"threshold_{index}", op.threshold.detach().clone().reshape(()))
                leak = float(op.leak.detach().clamp(max=1.0))
                self.register_buffer(f"leak_{index}", torch.tensor(leak))
                kinds[-1] = "lif" if leak == 1.0 else "lif-leaky"
            elif isinstance(op, Fork | Join):
                ops.append(_frozen_copy(op))
                kinds.append(type(op).__name__.lower())
            else:
                ops.append(_frozen_copy(op))
                kinds.append("op")
        self.ops = nn.ModuleList(ops)
        self.kinds = kinds

    def forward(self, x: torch.Tensor):
        steps = self.timesteps
        states: dict[int, torch.Tensor] = {}
        kept: dict[int, torch.Tensor] = {}
        spike_maps: dict[int, list[torch.Tensor]] = {}
        cached: torch.Tensor | None = None
        total: torch.Tensor | None = None
        for t in range(steps):
            h = x
            for i, (op, kind) in enumerate(zip(self.ops, self.kinds, strict=True)):
                if kind.startswith("lif"):
                    threshold = getattr(self, f"threshold_{i}")
                    if i in states:
                        previous = states[i] * getattr(self, f"leak_{i}") if kind == "lif-leaky" else states[i]
                        u = previous + h
                    else:
                        u = h
                    h = (u > threshold).float()
                    if t < steps - 1:
                        states[i] = u - threshold * h
                    if self.return_spikes:
                        spike_maps.setdefault(i, []).append(h)
                elif i <= self.first and cached is not None:
                    h = cached if i == self.first else h  # input-side work is done once, at step 1
                elif kind == "fork":
                    kept[op.slot] = h
                elif kind == "join":
                    h = h + op.branch(kept[op.slot])
                else:
                    h = op(h)
                    if i == self.first:
                        cached = h
            total = h if total is None else total + h
        logits = total / steps if steps > 1 else total
        if self.return_spikes:
            return (logits, *[torch.stack(spike_maps[i]) for i in sorted(spike_maps)])
        return logits


def _frozen_copy(op: nn.Module) -> nn.Module:
    import copy

    clone = copy.deepcopy(op)
    for parameter in clone.parameters():
        parameter.requires_grad_(False)
    return clone.eval()


def named_input(module: nn.Module, name: str) -> nn.Module:
    """Wrap ``module`` so it is called as ``wrapper(**{name: x})``, as bundles call models.

    Exporters read input names from ``forward``'s signature, so the parameter must carry the
    bundle's input name; a tiny class is made per name.
    """
    if not name.isidentifier() or keyword.iskeyword(name):
        raise ValueError(f"input name {name!r} is not a Python identifier")
    namespace: dict = {}
    exec(f"def forward(self, {name}):\n    return self.net({name})\n", namespace)  # noqa: S102
    cls = type(f"SNNInput_{name}", (nn.Module,), {"forward": namespace["forward"]})
    wrapper = cls()
    wrapper.net = module
    return wrapper
