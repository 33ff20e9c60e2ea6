"""The ``ptq`` transform: plain static int8 post-training quantization (the ``ptq-int8`` recipe).

The simulated model is torch's own pt2e flow with ExecuTorch's ``XNNPACKQuantizer``: export →
``prepare_pt2e`` (observers where XNNPACK runs int8) → calibration forwards → ``convert_pt2e``
(explicit quantize/dequantize pairs). That converted program is exactly what the ExecuTorch
exporter lowers, so the .pte and the simulated model share their scales: verification compares
the runtime with the same arithmetic, not with a second calibration.

The ONNX QDQ file gets the same ranges: every observer's scale and zero point (activations and weights) is kept
as a :class:`RangeAnchor`, together with what the float model computed at that point on the
first calibration sample. The ONNX exporter finds the graph tensor holding those values and writes
the scale through onnxruntime's ``TensorQuantOverrides`` (the mechanism learned ranges use), so
both formats quantize one set of ranges instead of calibrating twice with two tools.
"""

from __future__ import annotations

import contextlib
import copy
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
# which activations are quantized: every one XNNPACK runs in int8, only the inputs of
# matrix multiplications, or chosen from the graph (see resolve_scope)
SCOPES = ("auto", "all", "gemm-inputs")
# ONNX op types quantized under the gemm-inputs scope: MatMul/Gemm (activation and weight
# inputs) and Gather, whose lookup tables (embeddings) are then stored int8 once, shared with a
# tied LM head, instead of float (MiniLM's int8 file: 0.65x fp32 with its table float, 0.26x int8)
GEMM_OP_TYPES = ("MatMul", "Gemm", "Gather")
# values of an activation kept to recognise it in another graph (evenly spaced flat positions)
ANCHOR_POINTS = 512


@dataclass(frozen=True, eq=False)
class RangeAnchor:
    """One quantization point of the pt2e program, recognisable by value in another graph.

    ``values`` are the tensor's float values at ``positions`` (flat indices): for an activation,
    what the float model computed there on ``sample``; for a weight (``sample`` None), the weight
    as quantized (BatchNorm already folded). ``scale``/``zero_point`` are per tensor (one element)
    or per channel along ``axis``; the dtype is signed 8-bit, XNNPACK's.
    """

    shape: tuple[int, ...]
    positions: np.ndarray
    values: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None = None
    sample: Mapping[str, np.ndarray] | None = None

    @property
    def is_weight(self) -> bool:
        return self.sample is None


@dataclass
class Config:
    """Static int8 PTQ as XNNPACK runs it: symmetric int8 weights, affine int8 activations.

    ``calibration``: "minmax" (observed range) or "histogram" (torch's HistogramObserver, the range
    that minimises the L2 quantization error; XNNPACK's own default, slower to calibrate).
    ``activations``: "all" (every activation XNNPACK can run in int8: conv nets), "gemm-inputs"
    (only the inputs of linear layers and matmuls; norms, residual adds, softmax and every output
    stay float: transformers) or "auto" (gemm-inputs when the graph has a norm or a softmax).
    """

    samples: int = 64
    weight_bits: int = 8
    per_channel: bool = True
    activation_bits: int = 8
    calibration: str = "minmax"
    activations: str = "auto"


def spec_from_config(config: Config) -> QuantSpec:
    """The export plan for ``config``; rejects what XNNPACK's static int8 path cannot run."""
    if config.weight_bits != 8 or config.activation_bits != 8:
        raise EdgekitError(
            f"ptq supports 8-bit weights and activations only (XNNPACK static int8), got "
            f"weight_bits={config.weight_bits}, activation_bits={config.activation_bits}"
        )
    if config.calibration not in CALIBRATIONS:
        raise EdgekitError(f"ptq calibration must be one of {', '.join(CALIBRATIONS)}, got '{config.calibration}'")
    if config.activations not in SCOPES:
        raise EdgekitError(f"ptq activations must be one of {', '.join(SCOPES)}, got '{config.activations}'")
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


def xnnpack_quantizer(spec: QuantSpec, scope: str = "all") -> Any:
    """ExecuTorch's XNNPACKQuantizer configured from ``spec`` (observer chosen by spec.calibration).

    ``scope`` "gemm-inputs" annotates only the activation and weight inputs of linear layers and
    matmuls (see :func:`annotate_gemm_inputs`).
    """
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

    class Quantizer(XNNPACKQuantizer):
        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            if scope == "gemm-inputs":
                annotate_gemm_inputs(model, config)
                return model
            annotate_clamped_gemms(model, config)
            return super().annotate(model)

    return Quantizer().set_global(config)


_MATMULS = (torch.ops.aten.matmul.default, torch.ops.aten.bmm.default)


def resolve_scope(scope: str, program: torch.fx.GraphModule) -> str:
    """``auto`` -> "gemm-inputs" for graphs with a LayerNorm or a softmax (transformers), else "all".

    Why: a transformer's residual stream is normalised per token, and a few channels carry
    outliers ~100x the rest (MiniLM: residual range ~230, ordinary tokens std ~1). One per-tensor
    int8 range for it, or for the linear outputs that write it, has a step of ~0.9: one rounding
    step is a whole standard deviation after the LayerNorm. MiniLM fully int8 is 5.8 dB from float;
    with only the matmul inputs int8 (the weights per channel) it is 20.4 dB.
    """
    if scope != "auto":
        return scope
    transformer_ops = (
        torch.ops.aten.layer_norm.default,
        torch.ops.aten.native_layer_norm.default,
        torch.ops.aten.rms_norm.default,
        torch.ops.aten.softmax.int,
        torch.ops.aten._softmax.default,
    )
    return "gemm-inputs" if any(node.target in transformer_ops for node in program.graph.nodes) else "all"


def annotate_gemm_inputs(model: torch.fx.GraphModule, config: Any) -> int:
    """Annotate only the inputs of linear layers (activation int8 per tensor, weight int8 per
    channel) and of matmuls (both activations): every output, norm, softmax and residual add
    stays float. Returns how many ops were annotated."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer_utils import get_input_act_qspec, get_weight_qspec
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

    annotated = 0
    for node in model.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target == torch.ops.aten.linear.default:
            inputs = {node.args[0]: get_input_act_qspec(config), node.args[1]: get_weight_qspec(config)}
        elif node.target in _MATMULS:
            inputs = {node.args[0]: get_input_act_qspec(config), node.args[1]: get_input_act_qspec(config)}
        else:
            continue
        node.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(input_qspec_map=inputs, _annotated=True)
        annotated += 1
    return annotated


def dynamic_program(module: torch.nn.Module, example_inputs: Mapping[str, torch.Tensor]) -> torch.fx.GraphModule:
    """The program the .pte lowers under the gemm-inputs scope: XNNPACK's dynamic int8 linear
    (each row's activation range measured at run time, weights int8 per channel, output float).

    XNNPACK runs a static int8 linear only with an int8 output; the gemm-inputs scope keeps
    outputs float, and that is what XNNPACK's dynamic kernels do (the scheme ExecuTorch uses for
    transformers). Matmuls between two activations stay float there.
    """
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True)
    example = {name: tensor.contiguous() for name, tensor in example_inputs.items()}
    with torch.no_grad():
        graph_module = torch.export.export(module, (), example, strict=False).module()
        strip_noop_conversions(graph_module)
        prepared = prepare_pt2e(graph_module, XNNPACKQuantizer().set_global(config))
        prepared(**example)
        return convert_pt2e(prepared)


def per_row_reference(program: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of :func:`dynamic_program` that quantizes each activation *row* on its own range,
    as XNNPACK's dynamic int8 linear does at run time (its qd8 kernels take one scale and zero
    point per row), where torch's reference ops take one range for the whole tensor.

    The per-tensor reference is not what the .pte computes: on SmolLM2 (30 layers) it is 7.6 dB
    from float while the .pte is 20.9 dB, so it cannot serve as the .pte's simulated model.
    """
    reference = copy.deepcopy(program)
    graph = reference.graph
    choose = torch.ops.quantized_decomposed.choose_qparams.tensor
    dequantize = torch.ops.quantized_decomposed.dequantize_per_tensor.tensor
    for node in list(graph.nodes):
        if node.target != choose:
            continue
        source, low, high, eps = node.args[:4]
        quantizes = [q for getter in node.users for q in getter.users]
        for dequantized in [d for q in quantizes for d in q.users if d.target == dequantize]:
            with graph.inserting_before(dequantized):
                fake = graph.call_function(fake_quantize_rows, (source, low, high, eps))
            dequantized.replace_all_uses_with(fake)
    graph.eliminate_dead_code()
    reference.recompile()
    return reference


def fake_quantize_rows(x: torch.Tensor, low: int, high: int, eps: float) -> torch.Tensor:
    """Asymmetric fake quantization of every row (last axis) on its own range, zero included."""
    lowest = torch.clamp(x.amin(dim=-1, keepdim=True), max=0.0)
    highest = torch.clamp(x.amax(dim=-1, keepdim=True), min=0.0)
    scale = torch.clamp((highest - lowest) / float(high - low), min=eps)
    zero = torch.clamp(torch.round(low - lowest / scale), low, high)
    return (torch.clamp(torch.round(x / scale) + zero, low, high) - zero) * scale


_HARDTANH = (torch.ops.aten.hardtanh.default, torch.ops.aten.hardtanh_.default)
_GEMMS = (torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)


def annotate_clamped_gemms(model: torch.fx.GraphModule, config: Any) -> int:
    """Annotate conv/linear -> hardtanh (ReLU6) as one fused int8 op, the way XNNPACKQuantizer
    annotates conv -> ReLU: the output range is observed *after* the clamp.

    XNNPACKQuantizer knows conv+ReLU but not conv+ReLU6: it quantizes the conv output before the
    clamp (negatives and values above 6 included) and lets the clamp share that scale, wasting
    most int8 codes in every MobileNetV2 block. XNNPACK fuses the clamp into the conv either
    way. Returns how many patterns were annotated.
    """
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer_utils import (
        _is_annotated,
        _mark_nodes_as_annotated,
        get_bias_qspec,
        get_input_act_qspec,
        get_output_act_qspec,
        get_weight_qspec,
    )
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

    annotated = 0
    for clamp in model.graph.nodes:
        if clamp.op != "call_function" or clamp.target not in _HARDTANH:
            continue
        gemm = clamp.args[0]
        if not isinstance(gemm, torch.fx.Node) or gemm.target not in _GEMMS or len(gemm.users) != 1:
            continue
        inputs = {gemm.args[0]: get_input_act_qspec(config), gemm.args[1]: get_weight_qspec(config)}
        partition = [clamp, gemm, gemm.args[1]]
        bias = gemm.args[2] if len(gemm.args) > 2 else None
        if isinstance(bias, torch.fx.Node):
            inputs[bias] = get_bias_qspec(config)
            partition.append(bias)
        if _is_annotated(partition):
            continue
        gemm.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(input_qspec_map=inputs, _annotated=True)
        clamp.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(
            output_qspec=get_output_act_qspec(config), _annotated=True
        )
        _mark_nodes_as_annotated(partition)
        annotated += 1
    return annotated


def to_tensors(
    sample: Mapping[str, Any],
    example: Mapping[str, torch.Tensor],
    where: str,
    dynamic: Mapping[str, set[int]] | None = None,
) -> dict[str, torch.Tensor]:
    """A calibration sample as tensors of the example inputs' dtypes and shapes.

    Axes in ``dynamic`` (input name -> axes) may differ from the example's; the rest must match.
    """
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
        free = (dynamic or {}).get(name, set())
        if array.ndim != reference.ndim or any(
            size != expected
            for axis, (size, expected) in enumerate(zip(array.shape, reference.shape, strict=True))
            if axis not in free
        ):
            raise EdgekitError(
                f"{where}: input '{name}' has shape {list(array.shape)}, the model was exported for "
                f"{list(reference.shape)}"
            )
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise EdgekitError(f"{where}: input '{name}' contains NaN or infinity")
        tensors[name] = torch.from_numpy(np.ascontiguousarray(array)).to(reference.dtype)
    return tensors


def dynamic_calibration_axes(
    example: Mapping[str, torch.Tensor],
    samples: Sequence[Mapping[str, Any]],
    declared: Mapping[str, Mapping[int, str]],
) -> dict[str, set[int]]:
    """The declared dynamic axes along which some calibration sample differs from the example.

    Only those are traced dynamic: a text encoder calibrated on windows longer than its example
    sentence needs a dynamic sequence axis, an image model calibrated at its example size stays
    fully static (so shape arithmetic stays out of its quantized program).
    """
    axes: dict[str, set[int]] = {}
    for name, declared_axes in declared.items():
        if name not in example:
            continue
        for axis in declared_axes:
            sizes = {
                np.shape(sample[name])[axis] for sample in samples if name in sample and np.ndim(sample[name]) > axis
            }
            if sizes - {example[name].shape[axis]}:
                axes.setdefault(name, set()).add(axis)
    return axes


def quantize_program(
    module: torch.nn.Module,
    example_inputs: Mapping[str, torch.Tensor],
    samples: Sequence[Mapping[str, Any]],
    spec: QuantSpec,
    *,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    xnnpack_rewrites: bool = True,
    activations: str = "all",
) -> torch.fx.GraphModule:
    """Export, annotate for XNNPACK, calibrate on ``samples`` and convert: the pt2e int8 program.

    Shapes are the example inputs', except the ``dynamic_axes`` along which calibration samples
    differ (see :func:`dynamic_calibration_axes`); the .pte is re-exported at the example shape.
    ``xnnpack_rewrites`` applies the exact graph rewrites below that XNNPACK needs (off only to
    test that they are exact). ``activations`` is a :data:`SCOPES` entry (see :class:`Config`).
    """
    return _quantize(module, example_inputs, samples, spec, dynamic_axes or {}, xnnpack_rewrites, activations)[0]


def _quantize(
    module: torch.nn.Module,
    example_inputs: Mapping[str, torch.Tensor],
    samples: Sequence[Mapping[str, Any]],
    spec: QuantSpec,
    dynamic_axes: Mapping[str, Mapping[int, str]],
    xnnpack_rewrites: bool = True,
    activations: str = "all",
) -> tuple[torch.fx.GraphModule, list[RangeAnchor], str]:
    """:func:`quantize_program`, plus the anchors of its activation ranges (first sample) and the
    resolved activation scope."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if not samples:
        raise EdgekitError("ptq needs calibration data, got none")
    dynamic = dynamic_calibration_axes(example_inputs, samples, dynamic_axes)
    batches = [to_tensors(s, example_inputs, f"calibration sample {i}", dynamic) for i, s in enumerate(samples)]
    shapes = {name: {axis: torch.export.Dim.AUTO for axis in dynamic.get(name, ())} for name in example_inputs}
    module.eval()
    with torch.no_grad():
        example = {name: tensor.contiguous() for name, tensor in example_inputs.items()}
        exported = torch.export.export(module, (), example, dynamic_shapes=shapes if dynamic else None, strict=False)
        graph_module = exported.module()
        if xnnpack_rewrites:
            strip_noop_conversions(graph_module)
            relu6_as_hardtanh(graph_module)
        scope = resolve_scope(activations, graph_module)
        prepared = prepare_pt2e(graph_module, xnnpack_quantizer(spec, scope))
        with _recording_activations(prepared) as recorded:
            prepared(**batches[0])
        for batch in batches[1:]:
            prepared(**batch)
        anchors = _anchors(recorded, {name: t.numpy() for name, t in batches[0].items()})
        converted = convert_pt2e(prepared)
    if xnnpack_rewrites:
        collapse_identity_requantize(converted)
        requantize_before_copies(converted)
    return converted, anchors, scope


@contextlib.contextmanager
def _recording_activations(prepared: torch.fx.GraphModule):
    """Record what each observer sees during one forward, in call order.

    Yields a list of (observer, tensor, is_weight); an observer shared by several points
    (SharedQuantizationSpec) appears once per point.
    """
    observers: dict[int, tuple[torch.nn.Module, bool]] = {}
    for node in prepared.graph.nodes:
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        observer = prepared.get_submodule(str(node.target))
        if hasattr(observer, "calculate_qparams"):
            observers[id(observer)] = (observer, node.args[0].op == "get_attr")
    recorded: list[tuple[torch.nn.Module, torch.Tensor, bool]] = []

    def hook(observer: torch.nn.Module, inputs: tuple, _output: Any) -> None:
        if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].is_floating_point():
            recorded.append((observer, inputs[0].detach().clone(), observers[id(observer)][1]))

    handles = [observer.register_forward_hook(hook) for observer, _ in observers.values()]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


_PER_TENSOR = (torch.per_tensor_affine, torch.per_tensor_symmetric)
_PER_CHANNEL = (torch.per_channel_affine, torch.per_channel_symmetric)


def _anchors(
    recorded: Sequence[tuple[torch.nn.Module, torch.Tensor, bool]], sample: Mapping[str, np.ndarray]
) -> list[RangeAnchor]:
    """Each recorded tensor with its observer's final (all samples) int8 scale and zero point."""
    anchors = []
    for observer, tensor, is_weight in recorded:
        if observer.dtype != torch.int8:
            continue
        qscheme = getattr(observer, "qscheme", None)
        if qscheme not in _PER_TENSOR + _PER_CHANNEL:
            continue
        scale, zero_point = observer.calculate_qparams()
        axis = int(observer.ch_axis) if qscheme in _PER_CHANNEL else None
        anchors.append(_anchor(tensor, scale, zero_point, axis, None if is_weight else sample))
    return anchors


def _anchor(
    tensor: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    axis: int | None,
    sample: Mapping[str, np.ndarray] | None,
) -> RangeAnchor:
    """``tensor``'s quantization as a :class:`RangeAnchor`, recognisable by ``ANCHOR_POINTS`` of its values."""
    flat = tensor.detach().float().reshape(-1).numpy()
    positions = np.unique(np.linspace(0, flat.size - 1, min(flat.size, ANCHOR_POINTS)).astype(np.int64))
    return RangeAnchor(
        shape=tuple(tensor.shape),
        positions=positions,
        values=flat[positions].copy(),
        scale=scale.detach().float().reshape(-1).numpy().copy(),
        zero_point=zero_point.detach().reshape(-1).numpy().astype(np.int64),
        axis=axis,
        sample=sample,
    )


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


def relu6_as_hardtanh(program: torch.fx.GraphModule) -> int:
    """``aten.relu6(x)`` (``F.relu6``) -> ``aten.hardtanh(x, 0, 6)``, the form ``nn.ReLU6`` exports
    to and the quantizer and XNNPACK know. Returns how many were rewritten."""
    count = 0
    for node in program.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.relu6.default:
            node.target, node.args = torch.ops.aten.hardtanh.default, (node.args[0], 0.0, 6.0)
            count += 1
    if count:
        program.recompile()
    return count


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
    for the ExecuTorch exporter so that it lowers these scales instead of recalibrating;
    ``meta["range_anchors"]`` carries the same scales to the ONNX exporter. Under the
    gemm-inputs scope the ONNX file quantizes only ``meta["onnx_op_types"]`` (the simulated
    model's arithmetic exactly) and the .pte lowers :func:`dynamic_program` instead, whose
    per-row twin (:func:`per_row_reference`) is the .pte's simulated model in verification
    (``meta["simulated_by_format"]``).
    """
    spec = spec_from_config(config)
    samples = list(data)[: config.samples]
    program, anchors, scope = _quantize(
        bundle.module, bundle.example_inputs, samples, spec, bundle.dynamic_axes, activations=config.activations
    )
    meta = dict(bundle.meta)
    meta["pt2e_program"] = program
    meta["range_anchors"] = anchors
    if scope == "gemm-inputs":
        meta["range_anchors"] = anchors + quantize_lookup_tables(program)
        meta["onnx_op_types"] = list(GEMM_OP_TYPES)
        meta["pt2e_program"] = dynamic_program(bundle.module, bundle.example_inputs)
        meta["simulated_by_format"] = {"pte": per_row_reference(meta["pt2e_program"])}
    meta["ptq"] = {
        "activations": scope,
        "samples_used": len(samples),
        "quantized_ops": _count_quantized_ops(program),
        "input_shapes": {name: list(t.shape) for name, t in bundle.example_inputs.items()},
    }
    return bundle.replace(quant=spec, simulated=program, meta=meta)


def quantize_lookup_tables(program: torch.fx.GraphModule) -> list[RangeAnchor]:
    """Round every embedding table the program looks input ids up in to int8 per row (symmetric,
    weight-only) and return anchors that give the ONNX file the same scales.

    Under the gemm-inputs scope the ONNX file also quantizes its Gathers' tables (stored once in
    8 bits, shared with a tied LM head) and dequantizes the rows it looks up; the simulated model
    looks up the same rounded rows, so the two still compute the same numbers. The float model's
    own tensors are untouched: the program gets new ones.
    """
    anchors = []
    for node in list(program.graph.nodes):
        if node.target != torch.ops.aten.embedding.default or node.args[0].op != "get_attr":
            continue
        if node.args[1].op != "placeholder":  # position tables: their lookups fold to constants in ONNX
            continue
        target = node.args[0].target
        owner_path, _, attribute = target.rpartition(".")
        owner = program.get_submodule(owner_path) if owner_path else program
        table = getattr(owner, attribute).detach()
        scale = (table.abs().amax(dim=1) / 127.0).clamp_min(2**-12)
        rounded = torch.clamp(torch.round(table / scale[:, None]), -127, 127) * scale[:, None]
        setattr(owner, attribute, torch.nn.Parameter(rounded, requires_grad=False))
        anchors.append(_anchor(table, scale, torch.zeros_like(scale, dtype=torch.int64), 0, None))
    return anchors


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
