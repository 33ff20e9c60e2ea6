"""A pt2e int8 program whose activation ranges are the ones a method learned, never observed again.

XNNPACK's quantizer observes every range it annotates. A learned range (MobileQuant's) must reach
the .pte as it was learned, and only where it was learned: this quantizer annotates exactly the
module outputs the :class:`~edgekit.quantize.spec.QuantSpec` overrides name, with fixed scale and
zero point, plus the weights of the linear layers. Everything between two sites (norm internals,
RoPE products, views) stays float, as in the simulated model, so the .pte computes what the
simulation computed. The overrides are uint8 grids; XNNPACK's int8 grid with the zero point
shifted by 128 holds the same values.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch

from edgekit.errors import EdgekitError
from edgekit.quantize.fakequant import WeightQuant, symmetric_fake_quant
from edgekit.quantize.spec import QuantSpec, TensorOverride

_LINEAR = torch.ops.aten.linear.default
_CONV = torch.ops.aten.conv2d.default
# ops that only move values: XNNPACK runs them on int8 tensors only between a dequantize and a
# quantize of the same grid, so a fixed site's grid is carried through them
_DATA_MOVES = {
    torch.ops.aten.view.default,
    torch.ops.aten.reshape.default,
    torch.ops.aten.permute.default,
    torch.ops.aten.transpose.int,
    torch.ops.aten.unsqueeze.default,
    torch.ops.aten.squeeze.dim,
    torch.ops.aten.expand.default,
    torch.ops.aten.clone.default,
    torch.ops.aten.dropout.default,  # the identity in an exported (eval) program
    torch.ops.aten.max_pool2d.default,  # its outputs are some of its input's values: the same grid
}


def _moves_data(node: torch.fx.Node) -> bool:
    """A data move, or a classifier's flatten to [batch, features] (its linear's input). A ViT's
    patch flatten (to 3-D) stays float: with the grid carried through it, XNNPACK refused to load
    the DINOv2 program (why was not isolated)."""
    if node.target in _DATA_MOVES:
        return True
    value = node.meta.get("val")
    return node.target == torch.ops.aten.flatten.using_ints and isinstance(value, torch.Tensor) and value.dim() == 2


def _module_path(node: torch.fx.Node) -> str:
    """The innermost module a node was traced in (``""`` outside any submodule)."""
    return list(node.meta["nn_module_stack"].values())[-1][0]


def module_output_nodes(program: torch.fx.GraphModule) -> dict[str, torch.fx.Node]:
    """Module path -> the last node traced inside it (its output), from ``nn_module_stack``."""
    outputs: dict[str, torch.fx.Node] = {}
    for node in program.graph.nodes:  # topological order: the last node of a module wins
        if node.op != "call_function" or not node.meta.get("nn_module_stack"):
            continue
        parts = _module_path(node).split(".")
        for depth in range(1, len(parts) + 1):
            outputs[".".join(parts[:depth])] = node
    return outputs


def fixed_range_program(
    module: torch.nn.Module, example_inputs: Mapping[str, torch.Tensor], spec: QuantSpec
) -> torch.fx.GraphModule:
    """Export ``module``, fix its activation quantization from ``spec`` and convert: the int8
    program to lower to XNNPACK. Norm weights are stored at ``spec.norm_weight_bits`` values."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    sites = spec.overrides
    sixteen = sorted(path for path, fixed in sites.items() if fixed.bits != 8)
    # Leaving the 16-bit sites float is no way out: XNNPACK has no static linear with an int8 input
    # and a float output (q_proj, o_proj, ... in W8A8), so the partitioner leaves those linears out
    # and their per-channel weight dequantize has no portable kernel (tried on SmolLM2).
    if sixteen:
        raise EdgekitError(
            f"XNNPACK runs 8-bit activations only, and this plan fixes {len(sixteen)} sites at 16 bits "
            f"(e.g. {sixteen[0]}): export it as ONNX, or use the int8-only recipe for .pte"
        )
    if spec.weight_bits != 8:
        raise EdgekitError(f"XNNPACK runs 8-bit weights; this plan has {spec.weight_bits}-bit weights")
    module = copy.deepcopy(module).eval()
    if spec.norm_weight_bits is not None:
        _quantize_norm_weights(module, spec.norm_weight_bits)
    _quantize_lookup_tables(module)
    example = {name: tensor.contiguous() for name, tensor in example_inputs.items()}
    with torch.no_grad():
        program = torch.export.export(module, (), example, strict=False).module()
        from edgekit.quantize.ptq import strip_noop_conversions

        strip_noop_conversions(program)
        prepared = prepare_pt2e(program, _quantizer(spec, sites))
        prepared(**example)  # weight observers see their weights; activations are fixed
        return convert_pt2e(prepared)


def _quantize_norm_weights(module: torch.nn.Module, bits: int) -> None:
    """Store each RMSNorm / LayerNorm weight at its quantized value, as the simulation multiplies by it."""
    with torch.no_grad():
        for child in module.modules():
            norm = isinstance(child, torch.nn.LayerNorm) or type(child).__name__.endswith("RMSNorm")
            if norm and isinstance(getattr(child, "weight", None), torch.Tensor):
                child.weight.copy_(symmetric_fake_quant(child.weight, bits))


def _quantize_lookup_tables(module: torch.nn.Module) -> None:
    """Store each embedding table at its per-row int8 values: the simulation looks up those (the
    LM head's grid, which a QDQ graph shares with the table), while the program keeps it float."""
    with torch.no_grad():
        for child in module.modules():
            if isinstance(child, torch.nn.Embedding):
                rows = WeightQuant(child.num_embeddings, 8, per_channel=True, learn=False)
                child.weight.copy_(rows.quantize(child.weight))


def _fixed_spec(fixed: TensorOverride):
    from torchao.quantization.pt2e.quantizer import FixedQParamsQuantizationSpec

    zero_point = fixed.zero_point if fixed.signed else fixed.zero_point - 128
    return FixedQParamsQuantizationSpec(
        dtype=torch.int8,
        scale=float(fixed.scale),
        zero_point=int(zero_point),
        quant_min=-128,
        quant_max=127,
        qscheme=torch.per_tensor_affine,
    )


def _quantizer(spec: QuantSpec, sites: Mapping[str, TensorOverride]):
    """A pt2e quantizer that annotates the ``sites`` module outputs (fixed) and the linear weights."""
    from torchao.quantization.pt2e.quantizer import Quantizer

    class FixedRange(Quantizer):
        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            _annotate(model, spec, sites)
            return model

        def validate(self, model: torch.fx.GraphModule) -> None:
            return None

    return FixedRange()


def _annotate(model: torch.fx.GraphModule, spec: QuantSpec, sites: Mapping[str, TensorOverride]) -> None:
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

    # a site is a module's output or a graph input (an encoder's pixels)
    outputs = module_output_nodes(model) | {n.name: n for n in model.graph.nodes if n.op == "placeholder"}
    prefix = _common_prefix(outputs, sites)
    missing = [path for path in sites if prefix + path not in outputs]
    if missing:
        raise EdgekitError(f"quantization overrides name no module of the exported program: {', '.join(missing[:5])}")
    fixed = {outputs[prefix + path]: _fixed_spec(value) for path, value in sites.items()}
    pending = list(fixed.items())
    while pending:  # the same grid through the data moves after each site
        node, qspec = pending.pop()
        for user in node.users:
            if user.op == "call_function" and _moves_data(user) and user not in fixed:
                fixed[user] = qspec
                pending.append((user, qspec))
    weights = {channel: get_symmetric_quantization_config(is_per_channel=channel).weight for channel in (False, True)}
    for node in model.graph.nodes:
        inputs = {}
        if node.op == "call_function" and node.target in (_LINEAR, _CONV):
            path = _module_path(node).removeprefix(prefix)
            per_channel = spec.weight_per_channel or spec.named_per_channel(path)
            inputs[node.args[1]] = weights[per_channel]
        if node in fixed or inputs:
            node.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(
                input_qspec_map=inputs, output_qspec=fixed.get(node), _annotated=True
            )


def _common_prefix(outputs: Mapping[str, torch.fx.Node], overrides: Mapping[str, TensorOverride]) -> str:
    """The attribute path the exported wrapper puts before the bundle's module paths ("" or "model.")."""
    for prefix in ("", "model."):
        if all(prefix + path in outputs for path in overrides):
            return prefix
    return ""
