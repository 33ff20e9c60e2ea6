"""The per-op table of an ONNX graph, as device checks and the cost model read it (:class:`OpStat`).

The view is QNN's: a node runs in integer when every float tensor it reads comes out of a
``DequantizeLinear`` and every float tensor it writes goes only into ``QuantizeLinear`` nodes; the
backend then fuses DQ -> op -> Q into one integer kernel. Q/DQ nodes themselves are graph plumbing:
they are counted (``integer=True``, bits of their integer side, no FLOPs or bytes, since they fold
into their neighbours) and named by :data:`QDQ_OPS` so callers can set them apart.
"""

from __future__ import annotations

import ast
import operator
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgekit.devices.ops import OpStat
from edgekit.errors import EdgekitError

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
# Nodes that never touch tensor data: constants, aliases and shape metadata.
NOISE_OPS = frozenset({"Constant", "Identity", "Shape", "Size"})
# Constant inputs that are an op's parameters, not data: a QDQ Clip's float min/max bounds (QNN
# takes them as static parameters; onnxruntime's QDQ quantizer leaves them float).
PARAMETER_INPUTS = {"Clip": (1, 2)}
COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE})
_BITS = {
    TensorProto.UINT8: 8,
    TensorProto.INT8: 8,
    TensorProto.UINT16: 16,
    TensorProto.INT16: 16,
    TensorProto.INT4: 4,
    TensorProto.UINT4: 4,
    TensorProto.INT32: 32,
}


def shape_only_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of nodes computed from input *shapes* (and constants), never from input values.

    Position ids, RoPE cos/sin tables and causal masks are computed this way from ``Shape`` of the
    inputs. Once a deployment fixes its shapes (as QNN requires) they fold into constants, so they
    are neither quantized (an 8-bit ``Range`` limit would change the sequence length) nor listed as
    float islands. Pure-constant nodes (a weight's DequantizeLinear) are not in the set.
    """
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    data = {i.name for i in graph.input if i.name not in initializers}
    shaped: set[str] = set()
    names = set()
    for node in graph.node:  # topological order
        inputs = [name for name in node.input if name]
        if node.op_type in ("Shape", "Size"):
            shaped.update(node.output)
            names.add(node.name)
        elif any(name in data for name in inputs):
            data.update(node.output)
        elif any(name in shaped for name in inputs):
            shaped.update(node.output)
            names.add(node.name)
    return names


def onnx_op_stats(
    model_path: Path | str,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    include_shape_ops: bool = False,
) -> list[OpStat]:
    """Per op type (split by precision): count, integer or float, activation/weight bits, FLOPs, bytes.

    FLOPs (2 per multiply-accumulate, Conv/ConvTranspose/MatMul/Gemm only) and bytes moved come from
    shape inference with ``input_shapes`` (graph input name -> concrete shape); dynamic axes not
    given there are taken as 1. Constants, identities and the :func:`shape_only_nodes` subgraphs
    are left out unless ``include_shape_ops``.
    """
    path = Path(model_path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # protobuf raises DecodeError and friends on a damaged file
        raise EdgekitError(f"{path} is not a valid ONNX file (truncated?)") from None
    graph = _Graph(_with_shapes(model, dict(input_shapes or {})))
    skipped = set() if include_shape_ops else shape_only_nodes(model)
    rows: dict[tuple[str, bool, int | None, int | None], OpStat] = {}
    for node in graph.nodes:
        if node.op_type in NOISE_OPS or node.name in skipped or not graph.touches_float(node):
            continue
        if node.op_type in QDQ_OPS:
            integer, flops, moved = True, 0.0, 0.0
            act_bits, weight_bits = graph.qdq_bits(node), None
            if node.op_type == "DequantizeLinear" and graph.is_constant(node.input[0]):
                act_bits, weight_bits = None, act_bits  # a weight (or int32 bias) being dequantized
        else:
            integer = graph.is_integer(node)
            act_bits = graph.activation_bits(node) if integer else None
            weight_bits = graph.weight_bits(node)
            flops = graph.flops(node)
            moved = graph.bytes_moved(node)
        key = (node.op_type, integer, act_bits, weight_bits)
        row = rows.get(key)
        if row is None:
            row = rows[key] = OpStat(node.op_type, 0, integer, act_bits, weight_bits)
        row.count += 1
        row.flops += flops
        row.bytes_moved += moved
    return sorted(rows.values(), key=lambda r: (r.op_type in QDQ_OPS, -r.flops, r.op_type, not r.integer))


def float_islands(stats: Sequence[OpStat]) -> list[OpStat]:
    """The rows that do not run in integer (what a report must not hide)."""
    return [row for row in stats if not row.integer]


class _Graph:
    """Lookups over one graph: producers, consumers, tensor types and shapes, constants."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.nodes = list(graph.node)
        self.initializers = {init.name: init for init in graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.nodes:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        self.outputs = {o.name for o in graph.output}
        self.types: dict[str, int] = {}
        self.shapes: dict[str, list[int | None]] = {}
        for vi in [*graph.input, *graph.value_info, *graph.output]:
            tensor_type = vi.type.tensor_type
            self.types[vi.name] = tensor_type.elem_type
            if tensor_type.HasField("shape"):
                self.shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
        for init in graph.initializer:
            self.types[init.name] = init.data_type
            self.shapes[init.name] = list(init.dims)
        for node in self.nodes:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].type == onnx.AttributeProto.TENSOR:
                t = node.attribute[0].t
                self.types[node.output[0]] = t.data_type
                self.shapes[node.output[0]] = list(t.dims)

    # -- classification ------------------------------------------------------------------------
    def is_float(self, name: str) -> bool:
        return self.types.get(name) in FLOAT_TYPES

    def touches_float(self, node: onnx.NodeProto) -> bool:
        return any(self.is_float(n) for n in [*node.input, *node.output] if n)

    def is_integer(self, node: onnx.NodeProto) -> bool:
        parameters = PARAMETER_INPUTS.get(node.op_type, ())
        float_inputs = [
            n
            for index, n in enumerate(node.input)
            if n and self.is_float(n) and not (index in parameters and self.is_constant(n))
        ]
        float_outputs = [n for n in node.output if n and self.is_float(n)]
        if not float_inputs and not float_outputs:
            return False
        for name in float_inputs:
            producer = self.producer.get(name)
            if producer is None or producer.op_type != "DequantizeLinear":
                return False
        for name in float_outputs:
            consumers = self.consumers.get(name, [])
            if name in self.outputs or not consumers or any(c.op_type != "QuantizeLinear" for c in consumers):
                return False
        return True

    def _dq_of(self, name: str) -> onnx.NodeProto | None:
        producer = self.producer.get(name)
        return producer if producer is not None and producer.op_type == "DequantizeLinear" else None

    def is_constant(self, name: str) -> bool:
        return name in self.initializers or (name in self.producer and self.producer[name].op_type == "Constant")

    def _is_weight_dq(self, dq: onnx.NodeProto) -> bool:
        return self.is_constant(dq.input[0])

    def _int_type(self, name: str) -> int | None:
        return self.types.get(name)

    def activation_bits(self, node: onnx.NodeProto) -> int | None:
        bits = []
        for name in node.input:
            dq = self._dq_of(name) if name else None
            if dq is not None and not self._is_weight_dq(dq):
                bits.append(_BITS.get(self._int_type(dq.input[0]), 0))
        for name in node.output:
            for consumer in self.consumers.get(name, []):
                if consumer.op_type == "QuantizeLinear":
                    bits.append(self._q_bits(consumer))
        bits = [b for b in bits if b and b <= 16]
        return max(bits) if bits else None

    def weight_bits(self, node: onnx.NodeProto) -> int | None:
        if node.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm", "Gather"):
            weight_inputs = node.input[1:2] if node.op_type != "Gather" else node.input[:1]
        else:
            weight_inputs = node.input
        bits = []
        for name in weight_inputs:
            dq = self._dq_of(name) if name else None
            if dq is not None and self._is_weight_dq(dq):
                b = _BITS.get(self._int_type(dq.input[0]))
                if b and b <= 16:
                    bits.append(b)
        return max(bits) if bits else None

    def _q_bits(self, q: onnx.NodeProto) -> int:
        if len(q.input) > 2 and q.input[2]:
            return _BITS.get(self._int_type(q.input[2]), 8)
        to = next((a.i for a in q.attribute if a.name == "output_dtype"), 0)
        return _BITS.get(to, 8)

    def qdq_bits(self, node: onnx.NodeProto) -> int | None:
        if node.op_type == "QuantizeLinear":
            return self._q_bits(node)
        return _BITS.get(self._int_type(node.input[0]))

    # -- cost ------------------------------------------------------------------------------------
    def _shape(self, name: str) -> list[int] | None:
        shape = self.shapes.get(name)
        if shape is None or any(d is None for d in shape):
            return None
        return [int(d) for d in shape]

    def flops(self, node: onnx.NodeProto) -> float:
        op = node.op_type
        if op not in COMPUTE_OPS:
            return 0.0
        out = self._shape(node.output[0])
        a = self._shape(node.input[0])
        b = self._shape(node.input[1]) if len(node.input) > 1 else None
        if out is None or a is None or b is None:
            return 0.0
        if op == "MatMul":
            k = a[-1]
            return 2.0 * float(np.prod(out, dtype=np.float64)) * k
        if op == "Gemm":
            trans_a = next((x.i for x in node.attribute if x.name == "transA"), 0)
            k = a[0] if trans_a else a[-1]
            return 2.0 * float(np.prod(out, dtype=np.float64)) * k
        if op == "Conv":  # weight [Cout, Cin/group, k...]: each output element does Cin/group*k MACs
            return 2.0 * float(np.prod(out, dtype=np.float64)) * float(np.prod(b[1:], dtype=np.float64))
        # ConvTranspose: weight [Cin, Cout/group, k...]: each input element scatters Cout/group*k MACs
        return 2.0 * float(np.prod(a, dtype=np.float64)) * float(np.prod(b[1:], dtype=np.float64))

    def _stored_bytes_per_element(self, name: str, *, produced: bool) -> float:
        """Width a tensor has in memory: integer when it travels through Q/DQ, else its own type."""
        if produced:
            consumers = self.consumers.get(name, [])
            if consumers and name not in self.outputs and all(c.op_type == "QuantizeLinear" for c in consumers):
                return _BITS.get(self._int_type(consumers[0].output[0]), 8) / 8
        else:
            dq = self._dq_of(name)
            if dq is not None:
                return _BITS.get(self._int_type(dq.input[0]), 8) / 8
        dtype = self.types.get(name)
        if dtype in (None, TensorProto.UNDEFINED):
            return 0.0
        if dtype in (TensorProto.INT4, TensorProto.UINT4):
            return 0.5
        return float(np.dtype(helper.tensor_dtype_to_np_dtype(dtype)).itemsize)

    def bytes_moved(self, node: onnx.NodeProto) -> float:
        total = 0.0
        for names, produced in ((node.input, False), (node.output, True)):
            for name in names:
                shape = self._shape(name) if name else None
                if shape is not None:
                    total += float(np.prod(shape, dtype=np.float64)) * self._stored_bytes_per_element(
                        name, produced=produced
                    )
        return total


# -- shape inference with concrete inputs --------------------------------------------------------
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def _evaluate(expression: str, values: dict[str, int]) -> int | None:
    """Value of a symbolic dim such as ``past_sequence + 1`` given the symbols' values."""

    def walk(tree: ast.AST) -> int:
        if isinstance(tree, ast.Expression):
            return walk(tree.body)
        if isinstance(tree, ast.Constant) and isinstance(tree.value, int):
            return tree.value
        if isinstance(tree, ast.Name):
            return values.get(tree.id, 1)
        if isinstance(tree, ast.BinOp) and type(tree.op) in _OPS:
            return _OPS[type(tree.op)](walk(tree.left), walk(tree.right))
        raise ValueError(expression)

    try:
        return int(walk(ast.parse(expression, mode="eval")))
    except (ValueError, SyntaxError, ZeroDivisionError):
        return None


def _with_shapes(model: onnx.ModelProto, input_shapes: dict[str, Sequence[int]]) -> onnx.ModelProto:
    """A copy whose value infos carry concrete shapes for the given example input shapes."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    symbols: dict[str, int] = {}
    initializer_names = {init.name for init in graph.initializer}
    for value in graph.input:
        if value.name in initializer_names:
            continue
        dims = value.type.tensor_type.shape.dim
        given = input_shapes.get(value.name)
        if given is not None and len(given) != len(dims):
            raise EdgekitError(f"input {value.name} has rank {len(dims)}, the shape given has {len(given)}")
        for axis, dim in enumerate(dims):
            if dim.HasField("dim_value"):
                continue
            size = int(given[axis]) if given is not None else 1
            if dim.dim_param:
                symbols[dim.dim_param] = size
    # Symbolic dims the exporter already wrote into value infos can be evaluated directly.
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        for dim in vi.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value") and dim.dim_param:
                value = symbols.get(dim.dim_param, _evaluate(dim.dim_param, symbols))
                if value is not None:
                    dim.dim_value = value
    # Fill what is still unknown with ONNX shape inference (data propagation covers Reshape chains).
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # inference is best effort: keep what the exporter wrote
        return model
    known = {vi.name for vi in graph.value_info if _complete(vi)}
    for vi in inferred.graph.value_info:
        if vi.name not in known and _complete(vi):
            graph.value_info.append(vi)
    return model


def _complete(vi: onnx.ValueInfoProto) -> bool:
    tensor_type = vi.type.tensor_type
    return tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in tensor_type.shape.dim)
