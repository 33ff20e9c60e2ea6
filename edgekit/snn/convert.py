"""ANN -> SNN initialisation: read the ANN as a chain of ops, fold BatchNorm, set thresholds.

The ANN is traced with ``torch.fx`` so any VGG-style network built from conv, linear,
BatchNorm, ReLU, pooling, flatten and dropout converts, however its modules are nested. Every
ReLU becomes a LIF layer; the last conv/linear becomes the readout. Anything else (GELU,
LayerNorm, a residual add, ...) is named in one :class:`EdgekitError`.

Thresholds follow the paper: layer l's V_th is the 90th percentile of the ANN's pre-activation
(the input of its ReLU, BatchNorm folded) on one batch. A spike of layer l then stands for an
activation of V_th(l), so the next weight layer is scaled by V_th(l) (threshold balancing): the
SNN's potentials live in the ANN's units and rates approximate the ANN's activations.
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.fx
from torch import nn
from torch.nn import functional as F

from edgekit.errors import EdgekitError
from edgekit.snn.network import WEIGHT_OPS, SpikingNet
from edgekit.snn.neuron import LIF

SUPPORTED = "conv2d, linear, batchnorm, relu, max/avg pooling, flatten, dropout"
_RELU = (nn.ReLU, F.relu, torch.relu, "relu", "relu_")
_SKIP_MODULES = (nn.Dropout, nn.Dropout2d, nn.Identity)
_SKIP_FUNCTIONS = (F.dropout, F.dropout2d, torch.dropout)
_POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten)


class _ReluMarker(nn.Module):
    """Placeholder for a ReLU while the chain is read; replaced by a LIF layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)


class _Pooling(nn.Module):
    """A functional pooling/flatten call (``F.max_pool2d(x, 2)``, ``x.view(B, -1)``) as a module."""

    def __init__(self, fn, args: tuple, kwargs: dict) -> None:
        super().__init__()
        self.fn, self.args, self.kwargs = fn, args, kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, *self.args, **self.kwargs)


def _describe(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} '{node.target}'"
    target = getattr(node.target, "__name__", str(node.target))
    if node.target in (operator.add, torch.add, "add", "add_", operator.iadd):
        return f"residual add '{node.name}'"
    return f"{target} '{node.name}'"


def ann_chain(ann: nn.Module) -> list[nn.Module]:
    """The ANN as an ordered op list: folded conv/linear, ``_ReluMarker``, pooling/flatten modules."""
    try:
        graph = torch.fx.symbolic_trace(ann)
    except Exception as error:
        raise EdgekitError(
            f"cannot convert {type(ann).__name__} to a spiking network: torch.fx cannot trace it "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        ) from None
    modules = dict(graph.named_modules())
    chain: list[nn.Module] = []
    head: torch.fx.Node | None = None
    shape_nodes: set[torch.fx.Node] = set()

    def unsupported(node: torch.fx.Node, why: str = "") -> EdgekitError:
        return EdgekitError(
            f"cannot convert {type(ann).__name__} to a spiking network: {_describe(node, modules)} "
            f"is not supported{why} (supported: {SUPPORTED})"
        )

    for node in graph.graph.nodes:
        if node.op == "placeholder":
            if head is not None:
                raise EdgekitError(f"cannot convert {type(ann).__name__}: the SNN converter takes one input")
            head = node
            continue
        if node.op == "output":
            if node.args[0] is not head:
                raise unsupported(node, " (the output must be the last layer's result)")
            break
        if node.op == "get_attr":
            raise unsupported(node, " (a tensor attribute used in forward)")
        # `x.size(0)` and friends only feed a reshape
        if node.op == "call_method" and node.target in ("size", "dim") and node.args[0] is head:
            shape_nodes.add(node)
            continue
        if node.op == "call_function" and node.target is operator.getitem and node.args[0] in shape_nodes:
            shape_nodes.add(node)
            continue
        tensor_args = [a for a in node.all_input_nodes if a not in shape_nodes]
        if tensor_args != [head]:
            raise unsupported(node, " (only a plain chain of layers converts)")
        if node.op == "call_module":
            module = modules[node.target]
            if isinstance(module, WEIGHT_OPS):
                chain.append(copy.deepcopy(module).eval())
            elif isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
                if not chain or not isinstance(chain[-1], WEIGHT_OPS):
                    raise unsupported(node, " (BatchNorm must follow a conv/linear to be folded)")
                chain[-1] = fold_batchnorm(chain[-1], module)
            elif isinstance(module, nn.ReLU):
                chain.append(_ReluMarker())
            elif isinstance(module, _POOL_MODULES):
                chain.append(copy.deepcopy(module))
            elif isinstance(module, _SKIP_MODULES):
                pass
            else:
                raise unsupported(node)
        elif node.op in ("call_function", "call_method"):
            target = node.target
            rest_args = tuple(node.args[1:])
            if target in _RELU:
                chain.append(_ReluMarker())
            elif target in _SKIP_FUNCTIONS or target in ("dropout",):
                pass
            elif target in (F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, torch.flatten):
                chain.append(_Pooling(target, rest_args, dict(node.kwargs)))
            elif target in ("flatten",):
                chain.append(_Pooling(torch.flatten, rest_args, dict(node.kwargs)))
            elif target in ("view", "reshape"):
                chain.append(nn.Flatten(1))  # only (batch, -1) reshapes appear in a chain net's head
                if not (len(rest_args) == 2 and rest_args[1] == -1):
                    raise unsupported(node, " (only x.view(batch, -1) reshapes)")
            else:
                raise unsupported(node)
        else:
            raise unsupported(node)
        head = node
    weights = [i for i, op in enumerate(chain) if isinstance(op, WEIGHT_OPS)]
    if not weights:
        raise EdgekitError(f"cannot convert {type(ann).__name__}: it has no conv or linear layer")
    for i, op in enumerate(chain):
        if isinstance(op, _ReluMarker) and (i == 0 or not isinstance(chain[i - 1], WEIGHT_OPS)):
            raise EdgekitError(
                f"cannot convert {type(ann).__name__}: a ReLU at position {i} does not directly follow "
                "a conv/linear (+BatchNorm); spiking neurons integrate a layer's output"
            )
    if any(isinstance(op, _ReluMarker) for op in chain[weights[-1] :]):
        raise EdgekitError(
            f"cannot convert {type(ann).__name__}: the last layer is followed by a ReLU; "
            "the readout layer must be a plain conv/linear (it accumulates membrane potential)"
        )
    if any(not isinstance(op, nn.Flatten | _Pooling) for op in chain[weights[-1] + 1 :]):
        raise EdgekitError(f"cannot convert {type(ann).__name__}: only flatten may follow the readout layer")
    return chain


def fold_batchnorm(layer: nn.Module, norm: nn.BatchNorm1d | nn.BatchNorm2d) -> nn.Module:
    """conv/linear followed by BatchNorm (eval statistics) -> one conv/linear with a bias."""
    folded = copy.deepcopy(layer).eval()
    with torch.no_grad():
        scale = (
            norm.weight / torch.sqrt(norm.running_var + norm.eps)
            if norm.affine
            else 1.0 / torch.sqrt(norm.running_var + norm.eps)
        )
        shift = norm.bias if norm.affine else torch.zeros_like(norm.running_mean)
        bias = layer.bias if layer.bias is not None else torch.zeros_like(norm.running_mean)
        shape = (-1,) + (1,) * (folded.weight.dim() - 1)
        weight = folded.weight * scale.reshape(shape)
        folded.weight = nn.Parameter(weight.detach().clone())
        folded.bias = nn.Parameter(((bias - norm.running_mean) * scale + shift).detach().clone())
    return folded


def run_chain(chain: list[nn.Module], x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run the folded ANN chain; returns the logits and the pre-activation of every ReLU."""
    pre: list[torch.Tensor] = []
    for op in chain:
        if isinstance(op, _ReluMarker):
            pre.append(x)
        x = op(x)
    return x, pre


@torch.no_grad()
def convert(
    ann: nn.Module, batch: torch.Tensor, timesteps: int = 5, percentile: float = 90.0, dropout: float = 0.0
) -> SpikingNet:
    """The IIR-SNN initialisation of ``ann``: folded weights, IF neurons (leak 1), percentile thresholds."""
    if not 0 < percentile <= 100:
        raise EdgekitError(f"threshold percentile must be in (0, 100], got {percentile}")
    if not torch.isfinite(batch).all():
        raise EdgekitError("the threshold batch contains NaN or Inf")
    chain = ann_chain(ann)
    _, pre_activations = run_chain(chain, batch.float())
    thresholds = []
    for index, pre in enumerate(pre_activations):
        value = float(torch.quantile(pre.flatten().double()[:16_000_000], percentile / 100.0))
        if not value > 0:  # a layer that is mostly silent on this batch: use its positive part
            positive = pre[pre > 0]
            if positive.numel() == 0:
                raise EdgekitError(f"ReLU {index} is never active on the threshold batch; cannot set a threshold")
            value = float(torch.quantile(positive.double()[:16_000_000], percentile / 100.0))
        thresholds.append(value)
    ops: list[nn.Module] = []
    pending_scale = 1.0  # V_th of the last LIF layer, applied to the next weight layer's weights
    lif_index = 0
    for op in chain:
        if isinstance(op, _ReluMarker):
            ops.append(LIF(thresholds[lif_index]))
            pending_scale = thresholds[lif_index]
            lif_index += 1
        elif isinstance(op, WEIGHT_OPS):
            scaled = copy.deepcopy(op)
            scaled.weight.mul_(pending_scale)
            if scaled.bias is None:
                scaled.bias = nn.Parameter(torch.zeros(scaled.weight.shape[0]))
            pending_scale = 1.0
            ops.append(scaled)
        else:
            ops.append(op)
    for parameter in (p for op in ops for p in op.parameters()):
        parameter.requires_grad_(True)
    return SpikingNet(ops, timesteps, dropout).eval()
