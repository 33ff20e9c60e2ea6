"""ANN -> SNN initialisation: read the ANN as a chain of ops, fold BatchNorm, set thresholds.

The ANN is traced with ``torch.fx`` so any VGG- or ResNet-style network built from conv, linear,
BatchNorm, ReLU, pooling, flatten, dropout and post-activation residual blocks converts, however
its modules are nested. Every ReLU becomes a LIF layer; the last conv/linear becomes the readout;
a residual block becomes :class:`Fork` ... :class:`Join` around its body, the shortcut (identity,
or pooling + conv + BatchNorm) inside the Join. Anything else (GELU, LayerNorm, a sum that does
not feed a ReLU, ...) is named in one :class:`EdgekitError`.

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
from edgekit.models.fold import fold_batchnorm
from edgekit.snn.network import WEIGHT_OPS, Fork, Join, SpikingNet
from edgekit.snn.neuron import LIF

SUPPORTED = "conv2d, linear, batchnorm, relu, max/avg pooling, flatten, dropout, residual blocks"
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


_ADD = (operator.add, operator.iadd, torch.add, "add", "add_")


def _is_add(node: torch.fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and node.target in _ADD


def _residuals(
    graph: torch.fx.Graph, inputs_of, users_of, unsupported
) -> tuple[dict[torch.fx.Node, tuple[torch.fx.Node, list[torch.fx.Node]] | EdgekitError], set[torch.fx.Node]]:
    """Each residual add -> (the tensor its two branches start from, the shortcut's nodes in order).

    Of an add's two branches, walked back to the tensor they share, the one with a ReLU is the
    block's body (it stays in the chain); the other, empty or pooling + conv/linear + BatchNorm, is
    the shortcut (it moves into the Join). An add that is no such block maps to its error, raised
    when the walk reaches it, so the first unsupported op in the network is the one named.
    """
    joins: dict[torch.fx.Node, tuple[torch.fx.Node, list[torch.fx.Node]] | EdgekitError] = {}
    shortcut_nodes: set[torch.fx.Node] = set()
    for node in graph.nodes:
        if not _is_add(node):
            continue
        operands = [a for a in node.args if isinstance(a, torch.fx.Node)]
        if len(operands) != 2 or len(node.args) != 2 or node.kwargs:
            joins[node] = unsupported(node, " (only a plain sum of two tensors converts)")
            continue
        paths, starts = [], []
        for operand in operands:
            path, current = [], operand
            while current is not None and len(users_of(current)) == 1 and current.op != "placeholder":
                path.append(current)
                single = inputs_of(current)
                current = single[0] if len(single) == 1 else None
            paths.append(path[::-1])
            starts.append(current)
        has_relu = [any(_is_relu(n) for n in path) for path in paths]
        if None in starts or starts[0] is not starts[1]:
            joins[node] = unsupported(node, " (its two branches must start from the same tensor)")
        elif starts[0].op == "placeholder":
            joins[node] = unsupported(node, " (a shortcut from the raw input; the first layer must be a conv/linear)")
        elif has_relu.count(True) != 1:
            joins[node] = unsupported(node, " (exactly one branch must hold a ReLU: the block's body)")
        else:
            shortcut = paths[has_relu.index(False)]
            joins[node] = (starts[0], shortcut)
            shortcut_nodes.update(shortcut)
    return joins, shortcut_nodes


def _is_relu(node: torch.fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(node.graph.owning_module.get_submodule(node.target), nn.ReLU)
    return node.op in ("call_function", "call_method") and node.target in _RELU


def ann_chain(ann: nn.Module) -> list[nn.Module]:
    """The ANN as an ordered op list: folded conv/linear, ``_ReluMarker``, pooling/flatten modules,
    and :class:`Fork`/:class:`Join` around each residual block."""
    try:
        graph = torch.fx.symbolic_trace(ann)
    except Exception as error:
        raise EdgekitError(
            f"cannot convert {type(ann).__name__} to a spiking network: torch.fx cannot trace it "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        ) from None
    modules = dict(graph.named_modules())

    def unsupported(node: torch.fx.Node, why: str = "") -> EdgekitError:
        return EdgekitError(
            f"cannot convert {type(ann).__name__} to a spiking network: {_describe(node, modules)} "
            f"is not supported{why} (supported: {SUPPORTED})"
        )

    # `x.size(0)` and friends only feed a reshape: not tensors of the network
    shape_nodes: set[torch.fx.Node] = set()
    for node in graph.graph.nodes:
        if (node.op == "call_method" and node.target in ("size", "dim")) or (
            node.op == "call_function" and node.target is operator.getitem and node.args[0] in shape_nodes
        ):
            shape_nodes.add(node)

    def inputs_of(node: torch.fx.Node) -> list[torch.fx.Node]:
        return [a for a in node.all_input_nodes if a not in shape_nodes]

    def users_of(node: torch.fx.Node) -> list[torch.fx.Node]:
        return [u for u in node.users if u not in shape_nodes]

    joins, shortcut_nodes = _residuals(graph.graph, inputs_of, users_of, unsupported)
    blocks = [block for block in joins.values() if not isinstance(block, EdgekitError)]
    slots = {start: slot for slot, start in enumerate(dict.fromkeys(start for start, _ in blocks))}

    def append(chain: list[nn.Module], node: torch.fx.Node) -> None:
        """One traced op onto ``chain`` (the main chain or a shortcut's)."""
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
            elif not isinstance(module, _SKIP_MODULES):
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
                if not (len(rest_args) == 2 and rest_args[1] == -1):
                    raise unsupported(node, " (only x.view(batch, -1) reshapes)")
                chain.append(nn.Flatten(1))  # only (batch, -1) reshapes appear in a chain net's head
            else:
                raise unsupported(node)
        else:
            raise unsupported(node)

    chain: list[nn.Module] = []
    head: torch.fx.Node | None = None
    for node in graph.graph.nodes:
        if node in shape_nodes or node in shortcut_nodes:
            continue
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
        if node in joins:
            if isinstance(joins[node], EdgekitError):
                raise joins[node]
            start, shortcut = joins[node]
            if head not in node.args:
                raise unsupported(node, " (the residual add must directly follow its block's body)")
            if not chain or not isinstance(chain[-1], WEIGHT_OPS):
                raise unsupported(node, " (a block's body must end in a conv/linear (+BatchNorm))")
            if [_is_relu(user) for user in users_of(node)] != [True]:
                raise unsupported(node, " (the sum must feed a ReLU: post-activation blocks, as in ResNet)")
            branch: list[nn.Module] = []
            for shortcut_node in shortcut:
                append(branch, shortcut_node)
            if sum(isinstance(op, WEIGHT_OPS) for op in branch) > 1 or any(
                isinstance(op, _ReluMarker) for op in branch
            ):
                raise unsupported(node, " (a shortcut is the identity or pooling + one conv/linear)")
            chain.append(Join(slots[start], branch))
        else:
            if inputs_of(node) != [head]:
                raise unsupported(node, " (only chains of layers and residual blocks convert)")
            append(chain, node)
        head = node
        if node in slots:
            if not any(isinstance(op, WEIGHT_OPS) for op in chain):
                raise unsupported(node, " (a residual block before the first conv/linear)")
            chain.append(Fork(slots[node]))
    weights = [i for i, op in enumerate(chain) if isinstance(op, WEIGHT_OPS)]
    if not weights:
        raise EdgekitError(f"cannot convert {type(ann).__name__}: it has no conv or linear layer")
    for i, op in enumerate(chain):
        if isinstance(op, _ReluMarker) and (i == 0 or not isinstance(chain[i - 1], (*WEIGHT_OPS, Join))):
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


def _scaled(op: nn.Module, scale: float) -> nn.Module:
    """A copy of a conv/linear whose input spikes each stand for ``scale`` (threshold balancing)."""
    scaled = copy.deepcopy(op)
    scaled.weight.mul_(scale)
    if scaled.bias is None:
        scaled.bias = nn.Parameter(torch.zeros(scaled.weight.shape[0]))
    return scaled


def run_chain(chain: list[nn.Module], x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run the folded ANN chain; returns the logits and the pre-activation of every ReLU."""
    pre: list[torch.Tensor] = []
    kept: dict[int, torch.Tensor] = {}
    for op in chain:
        if isinstance(op, _ReluMarker):
            pre.append(x)
        if isinstance(op, Fork):
            kept[op.slot] = x
        elif isinstance(op, Join):
            x = x + op.branch(kept[op.slot])
        else:
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
    kept_scale: dict[int, float] = {}  # per Fork slot: what one kept spike stands for
    lif_index = 0
    for op in chain:
        if isinstance(op, _ReluMarker):
            ops.append(LIF(thresholds[lif_index]))
            pending_scale = thresholds[lif_index]
            lif_index += 1
        elif isinstance(op, WEIGHT_OPS):
            ops.append(_scaled(op, pending_scale))
            pending_scale = 1.0
        elif isinstance(op, Fork):
            kept_scale[op.slot] = pending_scale
            ops.append(copy.deepcopy(op))
        elif isinstance(op, Join):
            scale = kept_scale[op.slot]
            branch = [_scaled(o, scale) if isinstance(o, WEIGHT_OPS) else copy.deepcopy(o) for o in op.shortcut]
            has_weights = any(isinstance(o, WEIGHT_OPS) for o in branch)
            ops.append(Join(op.slot, branch, None if has_weights else scale))
        else:
            ops.append(op)
    for parameter in (p for op in ops for p in op.parameters()):
        parameter.requires_grad_(True)
    return SpikingNet(ops, timesteps, dropout).eval()
