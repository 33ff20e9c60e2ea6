"""MobileQuant for plain conv/linear networks (CNNs): learned weight clipping and activation ranges.

A CNN has none of the transformer sites MobileQuant's equivalent transforms sit at (no norm feeding
a projection, no attention), so what is learned here is the rest of the method: the per-channel
clipping of every Conv2d / Linear weight (bound = sigmoid(b) · max|W|) and the scale and offset of
every quantized activation, all jointly, end to end on the MSE of the network's output against the
float network's, with the same optimiser and schedules as the transformer models.

The network's dataflow is read from its ``forward`` with torch.fx, so a hand-written forward is
handled as a Sequential is. The network is the float one with each BatchNorm folded into the
conv/linear whose output it normalises (what the exported graph runs) and each *site* module
wrapped in a :class:`QuantSite`: every Conv2d and Linear, activation and average-pooling module. A
site's output is one tensor of the exported graph (the module's output), so the learned range is
written for exactly that tensor; the graph input is a site too. A conv/linear whose output only a
ReLU/ReLU6 reads has no output site of its own: NPUs (and XNNPACK) run the pair as one op,
quantized once at the activation's output. A max-pool keeps its input's grid. Tensor adds,
adaptive average pools and ReLUs a ``forward`` calls as functions (MobileNetV2's residuals and
global pool, ``torch.relu``) are made modules first (:func:`functions_as_modules`), so they are
sites too; other function calls (flatten, views) move values without changing them.
Every activation is 8-bit (a CNN has no norm or softmax to keep at 16), every weight per channel.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import operator

import torch
from torch import nn

from edgekit.errors import EdgekitError
from edgekit.models.fold import fold_batchnorm
from edgekit.quantize.fakequant import ActQuant, QuantSwitches, WeightQuant
from edgekit.quantize.llama import Bits
from edgekit.quantize.spec import FamilyPlan, TensorOverride


class Add(nn.Module):
    """A residual add as a module, so that its output is a site (see :func:`functions_as_modules`)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


# The clipping logits' start, b0: nearer the max than the paper's 4 (mobilequant.py says why).
CLIP_INIT = 6.0
WEIGHTED = (nn.Conv2d, nn.Linear)
SITE_TYPES = (*WEIGHTED, nn.ReLU, nn.ReLU6, nn.AvgPool2d, nn.AdaptiveAvgPool2d, Add)
# Leaves a plain conv net may also hold: folded away, inert in eval mode, or keeping their input's
# grid (a max-pool's output is some of its input's values: onnxruntime gives it the input's scale).
PASSIVE_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.Flatten, nn.Dropout, nn.Identity, nn.MaxPool2d)


def is_convnet(module: nn.Module) -> bool:
    """A network built of conv/linear, BatchNorm, activation and pooling modules only."""
    leaves = [m for m in module.modules() if not list(m.children())]
    known = all(isinstance(m, SITE_TYPES + PASSIVE_TYPES) for m in leaves)
    return known and any(isinstance(m, WEIGHTED) for m in leaves)


def _traced(model: nn.Module) -> torch.fx.GraphModule:
    """``model`` traced by torch.fx: what its ``forward`` does, module by module (paths kept)."""
    try:
        return torch.fx.symbolic_trace(model)
    except Exception as error:  # data-dependent control flow and the like
        raise EdgekitError(
            f"mobilequant follows a conv net's dataflow with torch.fx, which cannot trace this "
            f"{type(model).__name__}: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
        ) from None


def _feeds(model: nn.Module) -> dict[str, str]:
    """Module path -> the path of the module whose output is its only input, where that output
    goes nowhere else and each module runs once: the pairs that may be folded or fused."""
    nodes = [node for node in _traced(model).graph.nodes if node.op == "call_module"]
    calls: dict[str, int] = {}
    for node in nodes:
        calls[node.target] = calls.get(node.target, 0) + 1
    feeds = {}
    for node in nodes:
        source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        single = isinstance(source, torch.fx.Node) and source.op == "call_module" and len(source.users) == 1
        if single and calls[node.target] == calls[source.target] == 1:
            feeds[node.target] = source.target
    return feeds


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def fold_batchnorms(model: nn.Module) -> nn.Module:
    """Every BatchNorm whose input is a conv/linear layer's output (and nothing else reads that
    output) folded into the layer, in place; any other BatchNorm is a clear error."""
    norms = [path for path, m in model.named_modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    feeds = _feeds(model) if norms else {}
    for path in norms:
        layer = model.get_submodule(feeds[path]) if path in feeds else None
        if not isinstance(layer, WEIGHTED):
            raise EdgekitError(f"BatchNorm '{path}' does not follow a conv/linear layer: it cannot be folded")
        _replace(model, feeds[path], fold_batchnorm(layer, model.get_submodule(path)))
        _replace(model, path, nn.Identity())
    return model


def _as_module(node: torch.fx.Node) -> nn.Module | None:
    """The module a function call of ``node`` becomes (adds, adaptive average pools, ReLU/ReLU6)."""
    args, kwargs = node.args, {k: v for k, v in node.kwargs.items() if k != "inplace"}
    if node.op == "call_method" and node.target == "relu" and len(args) == 1 and not kwargs:
        return nn.ReLU()
    if node.op != "call_function" or kwargs:
        return None
    if node.target in (operator.add, torch.add) and len(args) == 2 and all(isinstance(a, torch.fx.Node) for a in args):
        return Add()
    if node.target is nn.functional.adaptive_avg_pool2d:
        return nn.AdaptiveAvgPool2d(args[1])
    if node.target in (torch.relu, nn.functional.relu) and len(args) == 1:
        return nn.ReLU()
    if node.target is nn.functional.relu6 and len(args) == 1:
        return nn.ReLU6()
    return None


def functions_as_modules(model: nn.Module) -> nn.Module:
    """``model`` with the tensor adds, adaptive average pools and ReLUs its ``forward`` calls as
    functions (MobileNetV2's residuals and global pool, ``F.relu`` in a hand-written forward) made
    modules, by an fx rewrite, so their outputs are sites like every other: onnxruntime quantizes
    those tensors whether or not the simulation does. With no such calls ``model`` is returned."""
    traced = _traced(model)
    rewritten = 0
    for node in list(traced.graph.nodes):
        module = _as_module(node)
        if module is None:
            continue
        name = f"{type(module).__name__.lower()}_{rewritten}"
        traced.add_submodule(name, module)
        with traced.graph.inserting_before(node):
            replacement = traced.graph.call_module(name, tuple(node.args[: 2 if isinstance(module, Add) else 1]))
        node.replace_all_uses_with(replacement)
        traced.graph.erase_node(node)
        rewritten += 1
    if not rewritten:
        return model
    traced.recompile()
    return traced


def _followed_by_activation(model: nn.Module) -> set[str]:
    """Paths of the conv/linear layers whose output only a ReLU/ReLU6 reads (folded BatchNorms and
    other identities between them skipped): NPUs and XNNPACK run the pair as one op and quantize
    once, at the activation's output, so such a layer's own output is no site."""
    feeds = _feeds(model)
    fused = set()
    for path, source in feeds.items():
        if not isinstance(model.get_submodule(path), (nn.ReLU, nn.ReLU6)):
            continue
        while isinstance(model.get_submodule(source), (nn.Identity, nn.Dropout)) and source in feeds:
            source = feeds[source]
        if isinstance(model.get_submodule(source), WEIGHTED):
            fused.add(source)
    return fused


# Every activation 8-bit (no 16-bit site), every weight per channel.
CONVNET_PLAN = FamilyPlan(every_weight_per_channel=True, has_norms=False)


class QuantSite(nn.Module):
    """A module whose output is a quantized tensor; a conv/linear also fake-quantizes its weight."""

    def __init__(self, module: nn.Module, bits: Bits, clip_init: float, quantize_output: bool = True) -> None:
        super().__init__()
        self.module = module
        self.act = ActQuant(bits.matmul) if quantize_output else nn.Identity()
        self.wquant = (
            WeightQuant(module.weight.shape[0], bits.weight, CONVNET_PLAN.every_weight_per_channel, init=clip_init)
            if isinstance(module, WEIGHTED)
            else None
        )

    def weight(self) -> torch.Tensor:
        weight = self.module.weight
        return self.wquant(weight.flatten(1)).view_as(weight)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        module = self.module
        if self.wquant is None or not self.wquant.enabled:
            return self.act(module(*inputs))
        (x,) = inputs
        if isinstance(module, nn.Conv2d):
            return self.act(module._conv_forward(x, self.weight(), module.bias))
        return self.act(nn.functional.linear(x, self.weight(), module.bias))


class QuantConvNet(nn.Module, QuantSwitches):
    """The simulated model of a plain conv net: the interface of the transformer ones, no transforms."""

    family = "convnet"
    plan = CONVNET_PLAN

    def __init__(self, float_module: nn.Module, bits: Bits = Bits(), clip_init: float = CLIP_INIT) -> None:
        super().__init__()
        if not is_convnet(float_module):
            raise EdgekitError(f"a {type(float_module).__name__} is not a plain conv/linear net")
        names = list(inspect.signature(float_module.forward).parameters)
        if len(names) != 1:
            raise EdgekitError(f"a conv net for mobilequant takes one input, this one takes {names}")
        self.input_name = names[0]
        # every activation at the matmul-input width, every weight per channel
        self.bits = dataclasses.replace(bits, other=bits.matmul, per_channel=True)
        self.net = functions_as_modules(fold_batchnorms(copy.deepcopy(float_module).eval()))
        fused = _followed_by_activation(self.net)
        self.paths: list[str] = []  # the modules whose output is a site
        self.sites: list[QuantSite] = []
        for path, module in list(self.net.named_modules()):
            if isinstance(module, SITE_TYPES) and path:
                parent, _, child = path.rpartition(".")
                owner = self.net.get_submodule(parent) if parent else self.net
                site = QuantSite(module, bits, clip_init, quantize_output=path not in fused)
                setattr(owner, child, site)
                self.sites.append(site)
                if path not in fused:
                    self.paths.append(path)
        outputs = [site.act for site in self.sites if isinstance(site.act, ActQuant)]
        self.acts = nn.ModuleList([nn.ModuleDict({str(i): act for i, act in enumerate(outputs)})])
        self.head_acts = nn.ModuleDict({"input": ActQuant(bits.matmul)})
        self.transforms = nn.ModuleList()
        self.switch_off()

    def weight_quants(self) -> list[WeightQuant]:
        return [site.wquant for site in self.sites if site.wquant is not None]

    def init_ranges(self) -> None:
        for quant in self.act_quants():
            quant.init_from_observed()

    @torch.no_grad()
    def fold(self) -> QuantConvNet:
        """Write the learned clipping into the weights; the model becomes plain float."""
        if not self.folded:
            for site in self.sites:
                if site.wquant is not None:
                    weight = site.module.weight
                    weight.copy_(site.wquant.clip(weight.flatten(1)).view_as(weight))
            self.mark_folded()
        return self

    def outputs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.net(self.head_acts["input"](batch[self.input_name]))

    hidden_state = outputs  # what the optimisation matches to the float network: the output itself

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        """The one input, positional or by the float network's name for it (see :func:`quant_convnet`)."""
        (x,) = (*args, *kwargs.values())
        return self.outputs({self.input_name: x})

    def overrides(self) -> dict[str, TensorOverride]:
        """Module path (or graph input name) -> the learned quantization of that tensor."""
        table = {f"net.{path}": self.net.get_submodule(path).act.override() for path in self.paths}
        return table | {self.input_name: self.head_acts["input"].override()}


@functools.cache
def _taking(name: str) -> type[QuantConvNet]:
    """A subclass whose ``forward`` signature names its input ``name``: exporters bind inputs (and
    dynamic axes) by the forward's parameter names, which must be the float network's."""
    parameters = [
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=torch.Tensor),
    ]

    def forward(self: QuantConvNet, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        return QuantConvNet.forward(self, *args, **kwargs)

    forward.__signature__ = inspect.Signature(parameters, return_annotation=torch.Tensor)
    return type(f"QuantConvNet[{name}]", (QuantConvNet,), {"forward": forward, "__module__": __name__})


def quant_convnet(float_module: nn.Module, bits: Bits = Bits(), clip_init: float = CLIP_INIT) -> QuantConvNet:
    """The simulated conv net, taking its one input by the float network's name for it."""
    names = list(inspect.signature(float_module.forward).parameters)
    kind = _taking(names[0]) if len(names) == 1 else QuantConvNet  # which refuses it, clearly
    return kind(float_module, bits, clip_init)
