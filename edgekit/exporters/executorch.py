"""ExecuTorch exporter: a bundle → ``model.pte`` delegated to XNNPACK (fp32 or static int8).

fp32: ``torch.export`` → ``to_edge_transform_and_lower(XnnpackPartitioner)`` → ``to_executorch``.
int8: the same lowering of the *converted pt2e program* the ``ptq`` transform calibrated
(``bundle.meta["pt2e_program"]``), so the .pte carries the simulated model's scales; quantize /
dequantize pairs around conv, linear, add, ... fuse into XNNPACK's int8 kernels.
Learned ranges (a QuantSpec with fixed overrides, MobileQuant): the program of
:func:`edgekit.quantize.pt2e_fixed.fixed_range_program`, quantized at exactly those sites.

Shapes are static (the bundle's example inputs): XNNPACK plans memory for them and the .pte's
method metadata records them. :func:`pte_op_stats` reads the lowered program and says, per op,
whether it runs inside the XNNPACK delegate and whether on integer tensors: float islands and
ops left to ExecuTorch's portable kernels are listed, with the partitioner's reason.
"""

from __future__ import annotations

import logging
import math
import operator
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgekit.devices.ops import OpStat
from edgekit.errors import EdgekitError
from edgekit.models.bundle import ModelBundle

PTE_NAME = "model.pte"
BACKEND = "XnnpackBackend"

# ops that XNNPACK folds into the preceding op's output clamp
_FUSED_ACTIVATIONS = ("aten.relu", "aten.hardtanh", "aten.clamp")
_GEMM = ("aten.linear", "aten.addmm", "aten.mm", "aten.bmm", "aten.matmul")


@dataclass
class TensorInfo:
    name: str
    dtype: str  # numpy spelling: "float32", "int64", ...
    shape: list[int]


@dataclass
class Delegation:
    """How much of the program XNNPACK took, and why the rest stayed out."""

    backend: str
    delegates: int  # executorch_call_delegate calls in the program
    delegated_ops: int  # compute ops inside delegates
    undelegated_ops: int  # compute ops left to ExecuTorch's portable kernels
    undelegated: dict[str, int] = field(default_factory=dict)  # op type -> count outside
    reasons: dict[str, str] = field(default_factory=dict)  # op type -> partitioner's first reason


@dataclass
class PteExport:
    path: Path
    files: list[Path]
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    quantized: bool
    delegation: Delegation
    ops: list[OpStat]
    size_bytes: int
    export_seconds: float
    static_shapes: bool = True  # the .pte runs only at the input shapes above

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary for manifests and reports."""
        return {
            "file": self.path.name,
            "files": [p.name for p in self.files],
            "inputs": [asdict(t) for t in self.inputs],
            "outputs": [asdict(t) for t in self.outputs],
            "quantized": self.quantized,
            "static_shapes": self.static_shapes,
            "delegation": asdict(self.delegation),
            "ops": [asdict(op) for op in self.ops],
            "size_bytes": self.size_bytes,
            "export_seconds": round(self.export_seconds, 3),
        }


def export_pte(
    bundle: ModelBundle,
    out_dir: str | os.PathLike[str],
    calib: Sequence[Mapping[str, Any]] | None = None,
) -> PteExport:
    """Write ``out_dir/model.pte`` for ``bundle`` and describe it.

    Float when ``bundle.quant`` is None; int8 otherwise, lowering ``bundle.meta["pt2e_program"]``
    when the ``ptq`` transform left one, else quantizing here from ``bundle.quant`` on ``calib``
    (calibration input dicts). Causal LMs export their fixed-length prefill, ``forward(input_ids)
    -> logits``, at the example input length.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    program = _program_to_lower(bundle, calib)
    # contiguous: a strided example (e.g. a permuted HWC image) would bake a channels-last dim
    # order into the .pte, and plain numpy inputs then fail in XNNPACK's shape propagation
    example = {name: tensor.contiguous() for name, tensor in bundle.example_inputs.items()}
    with torch.no_grad():
        exported = torch.export.export(program, (), example, strict=False)
    lowered, reasons = lower(exported)
    edge = lowered.exported_program()
    # read ops and outputs first: to_executorch rewrites the graph in place (out variants, allocs)
    ops = pte_op_stats(edge)
    outputs = _outputs(edge, bundle.output_names)
    delegation = _delegation(edge, ops, reasons)
    buffer = lowered.to_executorch().buffer
    path = out / PTE_NAME
    _write_atomic(path, buffer)
    return PteExport(
        path=path,
        files=[path],
        inputs=[_info(name, tensor) for name, tensor in example.items()],
        outputs=outputs,
        quantized=bundle.quant is not None,
        delegation=delegation,
        ops=ops,
        size_bytes=len(buffer),
        export_seconds=time.perf_counter() - started,
    )


class _Named(torch.nn.Module):
    """Puts the model under an attribute, so parameter names never start with a digit.

    XNNPACK's FuseBatchNormPass builds names like ``0_weight_fused_bn`` from an ``nn.Sequential``'s
    top-level children and then fails to find them; one level of nesting avoids that.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **inputs: torch.Tensor) -> Any:
        return self.model(**inputs)


def _program_to_lower(bundle: ModelBundle, calib: Sequence[Mapping[str, Any]] | None) -> torch.nn.Module:
    if bundle.quant is None:
        bundle.module.eval()
        return _Named(bundle.module)
    program = bundle.meta.get("pt2e_program")
    if program is not None:
        return program
    if bundle.quant.overrides:  # learned ranges: fixed as learned, nothing to calibrate
        from edgekit.quantize.pt2e_fixed import fixed_range_program

        return fixed_range_program(bundle.module, bundle.example_inputs, bundle.quant)
    from edgekit.quantize.ptq import quantize_program

    if not calib:
        raise EdgekitError("int8 ExecuTorch export needs calibration data (the bundle has no pt2e program)")
    samples = list(calib)[: bundle.quant.samples]
    return quantize_program(
        bundle.module, bundle.example_inputs, samples, bundle.quant, dynamic_axes=bundle.dynamic_axes
    )


def lower(exported: torch.export.ExportedProgram) -> tuple[Any, dict[str, str]]:
    """XNNPACK lowering of an exported program; also returns why nodes were left out."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    with _partition_reasons() as reasons:
        lowered = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
    return lowered, reasons


@contextmanager
def _partition_reasons() -> Iterator[dict[str, str]]:
    """Collect XNNPACK's ``WhyNoPartition`` debug records: op type -> first reason given."""
    reasons: dict[str, str] = {}

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            why = record.msg
            node = getattr(why, "node", None)
            if node is not None and getattr(why, "reason", ""):
                reasons.setdefault(_op_name(node.target), str(why.reason))

    logger = logging.getLogger("executorch.backends.xnnpack.partition")
    handler, level, propagate = Collect(logging.DEBUG), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield reasons
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _write_atomic(path: Path, data: bytes) -> None:
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        handle.write(data)
        temporary = Path(handle.name)
    os.replace(temporary, path)


def _numpy_dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _info(name: str, tensor: torch.Tensor) -> TensorInfo:
    return TensorInfo(name=name, dtype=_numpy_dtype(tensor.dtype), shape=[int(d) for d in tensor.shape])


def _outputs(edge: torch.export.ExportedProgram, names: Sequence[str]) -> list[TensorInfo]:
    output = next(n for n in edge.graph.nodes if n.op == "output")
    values = [a.meta["val"] for a in output.args[0]]
    labels = list(names) if len(names) == len(values) else [f"output_{i}" for i in range(len(values))]
    return [_info(label, value) for label, value in zip(labels, values, strict=True)]


# -- per-op statistics -----------------------------------------------------------------------


def _op_name(target: Any) -> str:
    """ "aten.convolution.default", "quantized_decomposed.quantize_per_tensor.default", ..."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    name = getattr(target, "__name__", None) or str(target)
    return name


def _short(name: str) -> str:
    """ "aten.convolution.default" -> "aten.convolution" (for matching op families)."""
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) >= 2 else name


def _is_quant(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and "quantize_per" in _op_name(node.target) and not _is_dequant(node)


def _is_dequant(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and "dequantize_per" in _op_name(node.target)


def _is_qparam_op(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and "choose_qparams" in _op_name(node.target)


def _bits(node: torch.fx.Node) -> int:
    """Bits of a quantize/dequantize node from its (quant_min, quant_max) arguments."""
    args = list(node.args)
    for index in range(len(args) - 1):
        low, high = args[index], args[index + 1]
        if isinstance(low, int) and isinstance(high, int) and not isinstance(low, bool) and high > low:
            return max(1, math.ceil(math.log2(high - low + 1)))
    return 8


def _tensor(node: Any) -> torch.Tensor | None:
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _tensor_args(node: torch.fx.Node) -> list[torch.fx.Node]:
    found: list[torch.fx.Node] = []
    for arg in node.args:
        for item in arg if isinstance(arg, list | tuple) else [arg]:
            if isinstance(item, torch.fx.Node) and _tensor(item) is not None:
                found.append(item)
    return found


def _weight_inputs(program: torch.export.ExportedProgram) -> set[str]:
    user = set(program.graph_signature.user_inputs)
    return {n.name for n in program.graph.nodes if n.op == "placeholder" and n.name not in user}


class _Graph:
    """One graph (the top-level program or a delegate's original module) with the rules for
    deciding which of its compute ops run on integer tensors."""

    def __init__(self, program: torch.export.ExportedProgram) -> None:
        self.program = program
        self.constants = _weight_inputs(program)
        self._integer: dict[torch.fx.Node, bool] = {}

    def compute_nodes(self) -> list[torch.fx.Node]:
        return [
            n
            for n in self.program.graph.nodes
            if n.op == "call_function"
            and n.target is not operator.getitem
            and "executorch_call_delegate" not in _op_name(n.target)
        ]

    def is_weight_dequant(self, node: torch.fx.Node) -> bool:
        source = node.args[0] if node.args else None
        return _is_dequant(node) and isinstance(source, torch.fx.Node) and self.is_constant(source)

    def integer(self, node: torch.fx.Node) -> bool:
        """Reads only dequantized (int8/int16-stored) tensors and writes only quantized ones
        (directly or through a fused activation): what XNNPACK runs as an integer kernel."""
        if node not in self._integer:
            self._integer[node] = self._decide(node)
        return self._integer[node]

    def is_constant(self, node: torch.fx.Node) -> bool:
        return node.op == "get_attr" or (node.op == "placeholder" and node.name in self.constants)

    def _activations(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        """Float tensor inputs that are not constants (a float bias is quantized to int32 by XNNPACK)."""
        return [a for a in _tensor_args(node) if _tensor(a).is_floating_point() and not self.is_constant(a)]

    def _decide(self, node: torch.fx.Node) -> bool:
        inputs = self._activations(node)
        if not inputs or _is_quant(node) or _is_dequant(node) or _is_qparam_op(node):
            return False
        fused_activation = _short(_op_name(node.target)) in _FUSED_ACTIVATIONS
        for arg in inputs:
            if _is_dequant(arg):
                continue
            if fused_activation and len(arg.users) == 1 and self._reads_quantized(arg):
                continue  # relu after conv: clamp folded into the conv's int8 output
            return False
        return self._writes_quantized(node)

    def _reads_quantized(self, node: torch.fx.Node) -> bool:
        floats = self._activations(node)
        return bool(floats) and all(_is_dequant(a) for a in floats)

    def _writes_quantized(self, node: torch.fx.Node) -> bool:
        users = list(node.users)
        if not users:
            return False
        for user in users:
            if _is_quant(user):
                continue
            if _short(_op_name(user.target)) in _FUSED_ACTIVATIONS and len(node.users) == 1:
                return all(_is_quant(u) for u in user.users) and bool(user.users)
            return False
        return True

    def conversion(self, node: torch.fx.Node) -> bool:
        """A quantize/dequantize that really converts (float <-> int) rather than carrying an int8
        tensor between two integer ops or dequantizing a constant weight."""
        if _is_dequant(node):
            if self.is_weight_dequant(node):
                return False
            users = list(node.users)
            return not users or not all(self.integer(u) or _is_quant(u) for u in users)
        if _is_quant(node):
            source = node.args[0]
            producer_integer = isinstance(source, torch.fx.Node) and (
                self.integer(source)
                or (
                    _short(_op_name(source.target)) in _FUSED_ACTIVATIONS
                    and any(self.integer(a) for a in _tensor_args(source))
                )
                or _is_dequant(source)
            )
            return not producer_integer
        return False


def _weight_bits(graph: _Graph, node: torch.fx.Node) -> int | None:
    for arg in _tensor_args(node)[1:]:
        if graph.is_weight_dequant(arg):
            return _bits(arg)
    return None


def _activation_bits(node: torch.fx.Node) -> int | None:
    for arg in _tensor_args(node):
        if _is_dequant(arg):
            return _bits(arg)
    return None


def _flops(node: torch.fx.Node) -> float:
    """2 x multiply-accumulates for convolutions and matrix products, 0 for everything else."""
    family = _short(_op_name(node.target))
    out = _tensor(node)
    args = _tensor_args(node)
    if out is None or not args:
        return 0.0
    if family == "aten.convolution" and len(args) >= 2:
        weight = _tensor(args[1])
        transposed = bool(node.args[6]) if len(node.args) > 6 else False
        kernel = math.prod(weight.shape[2:])
        if transposed:
            return 2.0 * _tensor(args[0]).numel() * weight.shape[1] * kernel
        return 2.0 * out.numel() * weight.shape[1] * kernel
    if family in _GEMM:
        source = args[1] if family == "aten.addmm" and len(args) >= 2 else args[0]
        return 2.0 * out.numel() * _tensor(source).shape[-1]
    return 0.0


def _bytes(graph: _Graph, node: torch.fx.Node, integer: bool) -> float:
    """Inputs read and output written at their stored width (int8 when dequantized from it)."""
    total = 0.0
    for arg in _tensor_args(node):
        stored = arg.args[0] if _is_dequant(arg) and isinstance(arg.args[0], torch.fx.Node) else arg
        tensor = _tensor(stored) if _tensor(stored) is not None else _tensor(arg)
        total += tensor.numel() * tensor.element_size()
    out = _tensor(node)
    if out is not None:
        width = 1 if integer else out.element_size()
        if integer:
            quant = next((u for u in node.users if _is_quant(u)), None)
            if quant is not None and _tensor(quant) is not None:
                width = _tensor(quant).element_size()
        total += out.numel() * width
    return total


def _node_stats(graph: _Graph, delegated: bool) -> Iterator[tuple[tuple, float, float]]:
    for node in graph.compute_nodes():
        if (_is_quant(node) or _is_dequant(node)) and not graph.conversion(node):
            continue
        name = _op_name(node.target)
        integer = graph.integer(node)
        if not delegated and not integer:
            # outside a delegate an op is integer when it reads int8/int16 storage (portable q-kernels)
            first = next(iter(_tensor_args(node)), None)
            dtype = _tensor(first).dtype if first is not None else None
            integer = dtype in (torch.int8, torch.uint8, torch.int16) and not (_is_quant(node) or _is_dequant(node))
        fused = integer and delegated and not any(_is_dequant(a) for a in _tensor_args(node))
        bits = _activation_bits(node) if integer else None
        if integer and bits is None:
            quant = next((u for u in node.users if _is_quant(u)), None)
            first = next(iter(_tensor_args(node)), None)
            if quant is not None:
                bits = _bits(quant)
            elif first is not None:
                bits = _tensor(first).element_size() * 8
        key = (name, integer, bits, _weight_bits(graph, node) if integer else None, delegated)
        # an activation fused into the previous integer op's output clamp moves no data of its own
        yield key, _flops(node), 0.0 if fused else _bytes(graph, node, integer)


def pte_op_stats(edge_program: torch.export.ExportedProgram) -> list[OpStat]:
    """Per-op summary of a lowered edge program (``EdgeProgramManager.exported_program()``).

    Ops inside ``executorch_call_delegate`` are read from each delegate's original (pre-lowering)
    module; the rest of the top-level graph runs on ExecuTorch's portable kernels. An op is
    ``integer`` when it reads dequantized int tensors and writes quantized ones; quantize and
    dequantize ops are listed only where they convert between float and int (graph or delegate
    edges, float islands), not between two integer ops.
    """
    stats: dict[tuple, OpStat] = {}

    def add(key: tuple, flops: float, moved: float) -> None:
        name, integer, bits, weight_bits, delegated = key
        stat = stats.get(key)
        if stat is None:
            stat = stats[key] = OpStat(
                op_type=name,
                count=0,
                integer=integer,
                activation_bits=bits,
                weight_bits=weight_bits,
                delegated=delegated,
            )
        stat.count += 1
        stat.flops += flops
        stat.bytes_moved += moved

    top = _Graph(edge_program)
    for key, flops, moved in _node_stats(top, delegated=False):
        add(key, flops, moved)
    for lowered in _delegates(edge_program):
        for key, flops, moved in _node_stats(_Graph(lowered.original_module), delegated=True):
            add(key, flops, moved)
    return sorted(stats.values(), key=lambda s: (not s.delegated, -s.flops, s.op_type))


def _delegates(edge_program: torch.export.ExportedProgram) -> list[Any]:
    modules = []
    for node in edge_program.graph.nodes:
        if node.op == "call_function" and "executorch_call_delegate" in _op_name(node.target):
            modules.append(getattr(edge_program.graph_module, node.args[0].target))
    return modules


def _delegation(edge: torch.export.ExportedProgram, ops: list[OpStat], reasons: dict[str, str]) -> Delegation:
    def is_compute(stat: OpStat) -> bool:
        return "quantize_per" not in stat.op_type

    outside = {s.op_type: s.count for s in ops if not s.delegated}
    delegates = _delegates(edge)
    backends = sorted({getattr(m, "backend_id", BACKEND) for m in delegates}) or [BACKEND]
    return Delegation(
        backend=",".join(backends),
        delegates=len(delegates),
        delegated_ops=sum(s.count for s in ops if s.delegated and is_compute(s)),
        undelegated_ops=sum(s.count for s in ops if not s.delegated and is_compute(s)),
        undelegated=outside,
        reasons={op: reasons[op] for op in outside if op in reasons},
    )
