"""Find, in an fp32 ONNX graph, the tensors a pt2e program quantized, and give them its scales.

The ``ptq`` transform calibrates once, in torch's pt2e flow (the ranges the .pte lowers). Its
:class:`~edgekit.quantize.ptq.RangeAnchor` records say what the float model computed at each
activation quantization point on one sample, and which weights were quantized with which
per-channel scales. Running the exported fp32 graph on that sample and comparing
values locates the same tensors without relying on names, which differ between torch.export's
program and the ONNX graph (BatchNorm folded on one side, ops renamed or decomposed on the
other). The result is a ``TensorOverride`` per located tensor, written by the QDQ quantizer
through onnxruntime's ``TensorQuantOverrides`` like any learned range; weights are located the
same way among the pre-processed graph's initializers (where BatchNorm is folded, as in pt2e) and
get pt2e's per-channel scales (XNNPACK floors a weight scale at 2**-12, onnxruntime does not).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgekit.quantize.spec import TensorOverride

# relative RMS difference under which two tensors are the same value (torch vs onnxruntime fp32
# arithmetic differs by ~1e-6 relative; distinct activations differ by far more than this)
SAME_VALUE_RTOL = 1e-3
_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE}


def anchored_overrides(fp32_path: Path, anchors: Sequence[Any]) -> tuple[dict[str, TensorOverride], list[str]]:
    """Graph tensor name -> the anchor's quantization, as uint8 (the QDQ graph's activation type).

    A signed int8 grid with zero point z is the uint8 grid with zero point z + 128 (same scale,
    same representable values), so no precision changes hands. Returns the overrides and notes on
    anchors that matched no tensor, or tensors that two anchors claim with different scales.
    """
    anchors = [anchor for anchor in anchors if not anchor.is_weight]
    model = onnx.load(str(fp32_path), load_external_data=False)
    shapes = _float_tensor_shapes(model)
    values: dict[str, np.ndarray] = {}
    for sample in {id(a.sample): a.sample for a in anchors}.values():
        values |= {f"{id(sample)}:{name}": array for name, array in _run_all(fp32_path, model, shapes, sample).items()}

    overrides: dict[str, TensorOverride] = {}
    unmatched = conflicts = 0
    for anchor in anchors:
        names = [
            key.split(":", 1)[1]
            for key, array in values.items()
            if key.startswith(f"{id(anchor.sample)}:") and tuple(array.shape) == anchor.shape and _same(array, anchor)
        ]
        if not names:
            unmatched += 1
            continue
        scale, zero_point = float(anchor.scale[0]), int(anchor.zero_point[0])
        chosen = TensorOverride(bits=8, scale=scale, zero_point=zero_point + 128, signed=False)
        for name in names:
            held = overrides.setdefault(name, chosen)  # the first anchor (producer's output) wins
            conflicts += held != chosen
    notes = [f"{len(overrides)} activation ranges taken from the pt2e program ({len(anchors)} quantization points)"]
    if unmatched:
        notes.append(
            f"{unmatched} pt2e quantization points have no fp32 ONNX tensor of equal value: calibrated by onnxruntime"
        )
    if conflicts:
        notes.append(f"{conflicts} pt2e quantization points share a tensor with another of different scale: first kept")
    return overrides, notes


def weight_overrides(pre_path: Path, anchors: Sequence[Any]) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """``TensorQuantOverrides`` giving each weight initializer equal in value to a pt2e weight its
    int8 scales. A 2-D weight may be stored transposed (MatMul reads [in, out]); its channel axis
    follows."""
    from onnxruntime.quantization import QuantType

    # conv/linear weights; a scalar constant pt2e observed would match any equal scalar initializer
    wanted = [anchor for anchor in anchors if anchor.is_weight and len(anchor.shape) >= 2]
    if not wanted:
        return {}, []
    model = onnx.load(str(pre_path), load_external_data=True)
    initializers = {
        init.name: numpy_helper.to_array(init) for init in model.graph.initializer if init.data_type in _FLOAT_TYPES
    }
    overrides: dict[str, list[dict[str, Any]]] = {}
    for anchor in wanted:
        for name, array in initializers.items():
            if name in overrides:
                continue
            axis = anchor.axis
            if tuple(array.shape) == anchor.shape and _same(array, anchor):
                pass
            elif array.ndim == 2 and tuple(array.shape[::-1]) == anchor.shape and _same(array, anchor, transposed=True):
                axis = None if axis is None else 1 - axis
            else:
                continue
            scales = anchor.scale.astype(np.float32)
            zeros = anchor.zero_point.astype(np.int8)
            if axis is None:
                overrides[name] = [{"quant_type": QuantType.QInt8, "scale": scales[0], "zero_point": zeros[0]}]
            else:
                overrides[name] = [
                    {"axis": axis, "quant_type": QuantType.QInt8, "scale": scale, "zero_point": zero}
                    for scale, zero in zip(scales, zeros, strict=True)
                ]
            break
    notes = [f"{len(overrides)} of {len(wanted)} weights quantized with the pt2e program's scales"]
    return overrides, notes


def _same(array: np.ndarray, anchor: Any, transposed: bool = False) -> bool:
    """``array`` (or its transpose) holds the anchor's values at the anchor's positions."""
    index = np.unravel_index(anchor.positions, anchor.shape)
    candidate = array[index[::-1] if transposed else index].astype(np.float64)
    reference = anchor.values.astype(np.float64)
    scale = float(np.sqrt(np.mean(reference**2))) if reference.size else 0.0
    difference = float(np.sqrt(np.mean((candidate - reference) ** 2))) if reference.size else 0.0
    return difference <= SAME_VALUE_RTOL * scale + 1e-7


def _float_tensor_shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Every float tensor a node writes (and float graph inputs), with its inferred shape."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    infos = {vi.name: vi for vi in [*graph.value_info, *graph.input, *graph.output]}
    initializers = {init.name for init in graph.initializer}
    names = [i.name for i in graph.input if i.name not in initializers]
    names += [out for node in graph.node if node.op_type != "Constant" for out in node.output if out]
    return {
        name: [d.dim_value if d.HasField("dim_value") else None for d in infos[name].type.tensor_type.shape.dim]
        for name in names
        if name in infos and infos[name].type.tensor_type.elem_type in _FLOAT_TYPES
    }


def _run_all(
    fp32_path: Path, model: onnx.ModelProto, shapes: dict[str, list], sample: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Every float tensor of the graph on ``sample`` (a copy of the graph with them all as outputs)."""
    from edgekit.exporters.verify import onnx_session

    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    existing = {o.name for o in augmented.graph.output}
    augmented.graph.output.extend(
        helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in shapes if name not in existing
    )
    # saved beside the original so its external-data references (relative paths) still resolve
    with tempfile.NamedTemporaryFile(suffix=".onnx", dir=fp32_path.parent, delete=True) as handle:
        onnx.save_model(augmented, handle.name)
        session = onnx_session(handle.name)
        inputs = {i.name: i.type for i in session.get_inputs()}
        feeds = {name: np.asarray(sample[name], dtype=_numpy_type(kind)) for name, kind in inputs.items()}
        wanted = [o.name for o in session.get_outputs() if o.name in shapes]
        results = session.run(wanted, feeds)
    return dict(zip(wanted, results, strict=True))


def _numpy_type(ort_type: str) -> type:
    return {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}.get(ort_type, np.float32)
