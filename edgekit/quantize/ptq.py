"""The ``ptq`` transform: plain static int8 post-training quantization (the ``ptq-int8`` recipe).

The simulated model is torch's own pt2e flow with ExecuTorch's ``XNNPACKQuantizer``: export →
``prepare_pt2e`` (observers where XNNPACK runs int8) → calibration forwards → ``convert_pt2e``
(explicit quantize/dequantize pairs). That converted program is exactly what the ExecuTorch
exporter lowers, so the .pte and the simulated model share their scales: verification compares
the runtime with the same arithmetic, not with a second calibration.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from edgekit.errors import EdgekitError
from edgekit.models.bundle import ModelBundle
from edgekit.quantize.spec import QuantSpec

CALIBRATIONS = ("minmax", "histogram")


@dataclass
class Config:
    """Static int8 PTQ as XNNPACK runs it: symmetric int8 weights, affine int8 activations.

    ``calibration``: "minmax" (observed range) or "histogram" (torch's HistogramObserver, the range
    that minimises the L2 quantization error; XNNPACK's own default, slower to calibrate).
    """

    samples: int = 64
    weight_bits: int = 8
    per_channel: bool = True
    activation_bits: int = 8
    calibration: str = "minmax"


def spec_from_config(config: Config) -> QuantSpec:
    """The export plan for ``config``; rejects what XNNPACK's static int8 path cannot run."""
    if config.weight_bits != 8 or config.activation_bits != 8:
        raise EdgekitError(
            f"ptq supports 8-bit weights and activations only (XNNPACK static int8), got "
            f"weight_bits={config.weight_bits}, activation_bits={config.activation_bits}"
        )
    if config.calibration not in CALIBRATIONS:
        raise EdgekitError(f"ptq calibration must be one of {', '.join(CALIBRATIONS)}, got '{config.calibration}'")
    if config.samples < 1:
        raise EdgekitError(f"ptq needs at least one calibration sample, got samples={config.samples}")
    return QuantSpec(
        weight_bits=8,
        weight_per_channel=config.per_channel,
        activation_bits=8,
        activation_symmetric=False,
        calibration=config.calibration,  # type: ignore[arg-type]
        samples=config.samples,
    )


def xnnpack_quantizer(spec: QuantSpec) -> Any:
    """ExecuTorch's XNNPACKQuantizer configured from ``spec`` (observer chosen by spec.calibration)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e import HistogramObserver, MinMaxObserver

    if spec.sixteen_bit_ops or spec.overrides:
        raise EdgekitError("the XNNPACK int8 path cannot honour 16-bit ops or fixed activation scales in the QuantSpec")
    config = get_symmetric_quantization_config(is_per_channel=spec.weight_per_channel, is_dynamic=False)
    observer = MinMaxObserver if spec.calibration == "minmax" else HistogramObserver
    activation = dataclasses.replace(config.input_activation, observer_or_fake_quant_ctr=observer.with_args(eps=2**-12))
    config = dataclasses.replace(config, input_activation=activation, output_activation=activation)
    return XNNPACKQuantizer().set_global(config)


def to_tensors(sample: Mapping[str, Any], example: Mapping[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """A calibration sample as tensors of the example inputs' dtypes and shapes (static shapes)."""
    missing = sorted(set(example) - set(sample))
    extra = sorted(set(sample) - set(example))
    if missing or extra:
        raise EdgekitError(
            f"{where}: inputs must be {', '.join(example)}; "
            + (f"missing {', '.join(missing)}" if missing else f"unexpected {', '.join(extra)}")
        )
    tensors: dict[str, torch.Tensor] = {}
    for name, reference in example.items():
        value = sample[name]
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if tuple(array.shape) != tuple(reference.shape):
            raise EdgekitError(
                f"{where}: input '{name}' has shape {list(array.shape)}, the model was exported for "
                f"{list(reference.shape)}"
            )
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise EdgekitError(f"{where}: input '{name}' contains NaN or infinity")
        tensors[name] = torch.from_numpy(np.ascontiguousarray(array)).to(reference.dtype)
    return tensors


def quantize_program(
    module: torch.nn.Module,
    example_inputs: Mapping[str, torch.Tensor],
    samples: Sequence[Mapping[str, Any]],
    spec: QuantSpec,
    *,
    xnnpack_rewrites: bool = True,
) -> torch.fx.GraphModule:
    """Export, annotate for XNNPACK, calibrate on ``samples`` and convert: the pt2e int8 program.

    Shapes are static (the example inputs'): the .pte is static, and a static graph keeps
    shape arithmetic (masks, slices) out of the quantized program. ``xnnpack_rewrites`` applies
    the exact graph rewrites below that XNNPACK needs (off only to test that they are exact).
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if not samples:
        raise EdgekitError("ptq needs calibration data, got none")
    batches = [to_tensors(s, example_inputs, f"calibration sample {i}") for i, s in enumerate(samples)]
    module.eval()
    with torch.no_grad():
        exported = torch.export.export(module, (), dict(example_inputs), strict=False)
        graph_module = exported.module()
        if xnnpack_rewrites:
            strip_noop_conversions(graph_module)
        prepared = prepare_pt2e(graph_module, xnnpack_quantizer(spec))
        for batch in batches:
            prepared(**batch)
        converted = convert_pt2e(prepared)
    if xnnpack_rewrites:
        collapse_identity_requantize(converted)
        requantize_before_copies(converted)
    return converted


_CONVERSIONS = {"aten.to.dtype", "aten.to.dtype_layout", "aten._to_copy.default", "aten.alias.default"}


def strip_noop_conversions(program: torch.fx.GraphModule) -> int:
    """Drop dtype conversions that convert nothing (``x.to(torch.float32)`` on float32 ``x``).

    Left in, pt2e observes their output separately and the quantized graph gets a requantize
    ``dq(a) -> to -> q(a)`` that collapses to an identity int8 -> int8 pair once ``to`` vanishes
    on lowering; see :func:`collapse_identity_requantize`. Returns how many were removed.
    """
    graph = program.graph
    removed = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        name = str(node.target)
        if name == "aten._assert_tensor_metadata.default" and not node.users:
            graph.erase_node(node)
            continue
        if name not in _CONVERSIONS or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        before, after = node.args[0].meta.get("val"), node.meta.get("val")
        if not (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)):
            continue
        same = (before.dtype, before.device, before.shape) == (after.dtype, after.device, after.shape)
        if same and node.kwargs.get("memory_format") in (None, torch.preserve_format):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            removed += 1
    graph.lint()
    program.recompile()
    return removed


def collapse_identity_requantize(program: torch.fx.GraphModule) -> int:
    """Replace ``q(a)(dq(a)(t))`` by ``t``: exact, and XNNPACK must never see it.

    pt2e leaves such pairs around no-op ops that vanish on lowering (RMSNorm's
    ``x.to(torch.float32)`` on a float tensor). A delegate holding an identity int8 -> int8
    requantize loads and runs, but freeing the program aborts the process (glibc ``double free``,
    executorch 1.4.1). Returns how many pairs were removed.
    """
    quantize = torch.ops.quantized_decomposed.quantize_per_tensor.default
    dequantize = torch.ops.quantized_decomposed.dequantize_per_tensor.default
    graph = program.graph
    removed = 0
    for node in list(graph.nodes):
        if node.target != quantize:
            continue
        source = node.args[0]
        if isinstance(source, torch.fx.Node) and source.target == dequantize and _qparams(source) == _qparams(node):
            node.replace_all_uses_with(source.args[0])
            graph.erase_node(node)
            if not source.users:
                graph.erase_node(source)
            removed += 1
    if removed:
        graph.lint()
        program.recompile()
    return removed


# data-movement ops XNNPACK runs on int8 only with identical input/output scale and zero point
_COPY_OPS = {
    "aten.slice.Tensor",
    "aten.select.int",
    "aten.narrow.default",
    "aten.view.default",
    "aten._unsafe_view.default",
    "aten.reshape.default",
    "aten.permute.default",
    "aten.transpose.int",
    "aten.t.default",
    "aten.unsqueeze.default",
    "aten.squeeze.dim",
    "aten.squeeze.dims",
    "aten.squeeze.default",
    "aten.expand.default",
    "aten.clone.default",
    "aten.flatten.using_ints",
}


def _qparams(node: torch.fx.Node) -> tuple:
    return tuple(node.args[1:])


def requantize_before_copies(program: torch.fx.GraphModule) -> int:
    """Make every int8 copy op (slice, view, permute, ...) keep its input's scale and zero point.

    pt2e leaves ops the quantizer did not annotate between the dequantize of their input and the
    quantize their consumer asked for: ``dq(a) -> slice -> q(b)``, e.g. RoPE's rotate-half slices
    feeding a ``cat`` whose inputs share the cat's scale. XNNPACK cannot build an int8 slice with
    a != b (``XNNCompiler: Failed to create static slice node ... invalid_parameter``). Rewriting to
    ``dq(a) -> q(b) -> dq(b) -> slice -> q(b)`` is exact (slicing commutes with elementwise
    rounding, and q(b)(dq(b)(q(b)(v))) = q(b)(v)) and lowers to one requantize plus a plain int8
    slice. Returns how many ops were rewritten.
    """
    quantize = torch.ops.quantized_decomposed.quantize_per_tensor.default
    dequantize = torch.ops.quantized_decomposed.dequantize_per_tensor.default
    graph = program.graph
    rewritten = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or str(node.target) not in _COPY_OPS:
            continue
        source = node.args[0]
        if not (isinstance(source, torch.fx.Node) and source.target == dequantize):
            continue
        groups: dict[tuple, list[torch.fx.Node]] = {}
        for user in node.users:
            if user.target == quantize and _qparams(user) != _qparams(source):
                groups.setdefault(_qparams(user), []).append(user)
        for params, users in groups.items():
            with graph.inserting_before(node):
                requant = graph.call_function(quantize, (source, *params))
                back = graph.call_function(dequantize, (requant, *params))
                copy = graph.node_copy(node, lambda n, a=source, b=back: b if n is a else n)
            for user in users:
                user.replace_input_with(node, copy)
            rewritten += 1
        if not node.users:
            graph.erase_node(node)
    if rewritten:
        graph.lint()
        program.recompile()
    return rewritten


def apply(bundle: ModelBundle, data: Sequence[Mapping[str, Any]], config: Config) -> ModelBundle:
    """``bundle`` with ``quant`` (the plan) and ``simulated`` (the converted pt2e int8 program).

    ``data`` holds calibration input dicts named like ``bundle.example_inputs``; the first
    ``config.samples`` are used. ``meta["pt2e_program"]`` is the same converted program, kept
    for the ExecuTorch exporter so that it lowers these scales instead of recalibrating.
    """
    spec = spec_from_config(config)
    samples = list(data)[: config.samples]
    program = quantize_program(bundle.module, bundle.example_inputs, samples, spec)
    meta = dict(bundle.meta)
    meta["pt2e_program"] = program
    meta["ptq"] = {
        "samples_used": len(samples),
        "quantized_ops": _count_quantized_ops(program),
        "input_shapes": {name: list(t.shape) for name, t in bundle.example_inputs.items()},
    }
    return bundle.replace(quant=spec, simulated=program, meta=meta)


def _count_quantized_ops(program: torch.fx.GraphModule) -> dict[str, int]:
    """Ops whose activation input is dequantized from int8: what the quantizer annotated."""
    dequantize = torch.ops.quantized_decomposed.dequantize_per_tensor.default
    counts: dict[str, int] = {}
    for node in program.graph.nodes:
        if node.op != "call_function" or "quantized_decomposed" in str(node.target):
            continue
        if node.args and getattr(node.args[0], "target", None) == dequantize:
            name = str(node.target).split(".")
            key = ".".join(name[:2]) if name[0] == "aten" else str(node.target)
            counts[key] = counts.get(key, 0) + 1
    return counts
