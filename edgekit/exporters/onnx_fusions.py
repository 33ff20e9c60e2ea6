"""Graph fusions applied before QDQ quantization, so a quantized graph matches what an NPU runs.

Why RMSNorm is fused: the exporter traces a LLaMA RMSNorm as ``Pow → ReduceMean → Add(eps) →
Sqrt → Reciprocal → Mul(x) → Mul(γ)``. Quantized op by op, every intermediate gets one
per-tensor range, and a residual stream with a massive activation (SmolLM2: ~24,800 in one
channel of one token) makes ``x²`` span ~6e8: on a 16-bit grid the mean square of every ordinary
token rounds to zero, ``1/sqrt(eps)`` ≈ 316 multiplies its hidden state, and the model collapses
(measured: perplexity 24 → thousands). NPUs run the norm as one op (QNN's RmsNorm) with its
input, weight and output quantized and the statistics kept internal; onnxruntime's
``SimplifiedLayerNormalization`` (onnx domain, what its transformer optimiser emits for LLaMA and
what the QNN execution provider maps to RmsNorm) is that op.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

FUSED_RMS_NORM = "SimplifiedLayerNormalization"


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Small constant values by tensor name (inline initializers and Constant nodes)."""
    values = {
        init.name: numpy_helper.to_array(init)
        for init in model.graph.initializer
        if init.data_location != onnx.TensorProto.EXTERNAL and np.prod(init.dims, dtype=np.int64) <= 16
    }
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _scalar(values: dict[str, np.ndarray], name: str) -> float | None:
    value = values.get(name)
    return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


def fuse_rms_norms(model: onnx.ModelProto) -> list[str]:
    """Replace each decomposed RMSNorm with one ``SimplifiedLayerNormalization``, in place.

    Matches ``y = γ · (x · 1/sqrt(mean(x², last axis) + eps))`` with γ an initializer, whatever
    the operand order of the Muls, and only when the intermediates feed nothing else. The fused
    node writes the same output tensor name, so quantization overrides keyed by it still apply.
    Returns the γ initializer names (callers choose their quantization).
    """
    graph = model.graph
    values = _constants(model)
    initializers = {init.name for init in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def only_consumer(name: str, op_type: str) -> onnx.NodeProto | None:
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op_type else None

    def other_input(node: onnx.NodeProto, known: str) -> str | None:
        if len(node.input) != 2 or known not in node.input:
            return None
        return node.input[1] if node.input[0] == known else node.input[0]

    removed: set[int] = set()
    weights: list[str] = []
    replacements: dict[int, onnx.NodeProto] = {}
    for reduce_mean in graph.node:
        if reduce_mean.op_type != "ReduceMean":
            continue
        square = producer.get(reduce_mean.input[0])
        if square is None or square.op_type != "Pow" or _scalar(values, square.input[1]) != 2.0:
            continue
        x = square.input[0]
        attributes = {a.name: helper.get_attribute_value(a) for a in reduce_mean.attribute}
        # axes: an input from opset 18 on, an attribute before
        axes = values.get(reduce_mean.input[1]) if len(reduce_mean.input) > 1 else attributes.get("axes")
        keepdims = attributes.get("keepdims", 1)
        if axes is None or np.size(axes) != 1 or int(np.reshape(axes, -1)[0]) != -1 or not keepdims:
            continue
        add = only_consumer(reduce_mean.output[0], "Add")
        epsilon = _scalar(values, other_input(add, reduce_mean.output[0]) or "") if add else None
        sqrt = only_consumer(add.output[0], "Sqrt") if add else None
        reciprocal = only_consumer(sqrt.output[0], "Reciprocal") if sqrt else None
        if epsilon is None or not 0.0 < epsilon <= 1e-3 or reciprocal is None:
            continue
        normalise = only_consumer(reciprocal.output[0], "Mul")
        if normalise is None or other_input(normalise, reciprocal.output[0]) != x:
            continue
        if len(consumers.get(square.output[0], [])) != 1:
            continue
        scale = only_consumer(normalise.output[0], "Mul")
        gamma = other_input(scale, normalise.output[0]) if scale else None
        if gamma is None or gamma not in initializers:
            continue
        fused = helper.make_node(
            FUSED_RMS_NORM,
            [x, gamma],
            [scale.output[0]],
            name=f"{scale.name or scale.output[0]}/rms_norm",
            axis=-1,
            epsilon=epsilon,
            stash_type=1,
        )
        chain = (square, reduce_mean, add, sqrt, reciprocal, normalise, scale)
        removed.update(id(node) for node in chain)
        replacements[id(scale)] = fused
        weights.append(gamma)
    if not replacements:
        return []
    kept = [
        replacements.get(id(node), node) for node in graph.node if id(node) in replacements or id(node) not in removed
    ]
    del graph.node[:]
    graph.node.extend(kept)
    return weights
