"""ONNX exporter: fp32 graphs, and QDQ 8/16-bit graphs for onnxruntime (CPU, QNN).

Why it is built this way:

- Graphs come from ``torch.onnx.export(dynamo=True)`` at opset 21, the first opset whose standard
  ``QuantizeLinear``/``DequantizeLinear`` carry uint16/int16 and int4, so 16-bit activations and 4-bit
  weights need no ``com.microsoft`` contrib ops, and an opset the QNN execution provider accepts.
  Later opsets bring fused ``Attention``/``RMSNormalization`` nodes the ORT quantizer does not know.
- QDQ follows :class:`~edgekit.quantize.spec.QuantSpec`: ``quant_pre_process`` (shape inference and
  graph optimisation), then one calibration pass whose ranges edgekit inspects and fixes before
  ``quantize_static`` writes them (via ORT's calibration cache, so nothing is calibrated twice).
  Every op type in the graph is quantized (full-integer, what an NPU needs) except
  ``spec.float_ops`` and the subgraphs computed from input shapes alone (positions, RoPE tables,
  masks: constants once shapes are fixed); fixed ranges a transform learned go in as
  ``TensorQuantOverrides`` (by tensor name or module path) and are written exactly as given.
- Causal LMs with a KV cache become two graphs, ``prefill.onnx`` and ``decode.onnx``, whose weights
  live once in ``weights.bin``: initializers with identical bytes are stored at one offset that
  both graphs reference.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import io
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from edgekit.errors import EdgekitError
from edgekit.exporters.onnx_fusions import FUSED_RMS_NORM, fuse_rms_norms
from edgekit.exporters.onnx_ops import shape_only_nodes
from edgekit.models.bundle import ModelBundle
from edgekit.quantize.spec import QuantSpec, TensorOverride

OPSET = 21
# Protobuf caps a file at 2 GB; above this many bytes of weights, single-graph models keep their
# weights in ``model.onnx.data`` next to the graph. LMs always use external data (shared file).
EXTERNAL_DATA_BYTES = 1_500_000_000
WEIGHTS_FILE = "weights.bin"
# Initializers smaller than this stay inside the graph file (scales, shapes, tiny biases).
INLINE_BYTES = 1024
# Offsets of large tensors in the shared weights file are page-aligned so runtimes may memory-map
# them; small ones only to a cache line, so tiny models do not grow by a page per tensor.
ALIGN = 4096
SMALL_ALIGN = 64
PAGE_ALIGNED_BYTES = 1 << 16
# Softmax is shift-invariant and exp(-24) < 4e-11: scores more than this below the calibrated
# maximum contribute nothing, so a Softmax input's range is clamped to [max - 24, max]. This keeps
# additive attention masks (-1e4) from swallowing the whole 8-bit grid.
SOFTMAX_INPUT_RANGE = 24.0
# QNN rejects quantization ranges narrower than this (and so would a zero scale).
MINIMUM_REAL_RANGE = 1e-4
# Q/DQ and Cast are plumbing, never annotated themselves.
_NOT_QUANTIZED = {"QuantizeLinear", "DequantizeLinear", "Cast"}
_NORM_OPS = ("LayerNormalization", "InstanceNormalization", "BatchNormalization")
_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div"})

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


# -- what an export produced ------------------------------------------------------------------
@dataclass
class TensorInfo:
    """A graph input or output: name, numpy dtype name and shape (dynamic axes as strings)."""

    name: str
    dtype: str
    shape: list[int | str]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass
class EdgeQuant:
    """The quantization of a tensor at a graph edge: the Q after an input / the DQ before an output."""

    scale: float
    zero_point: int
    dtype: str  # "uint8", "int8", "uint16", "int16"

    @property
    def bits(self) -> int:
        return np.dtype(self.dtype).itemsize * 8

    def to_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "zero_point": self.zero_point, "dtype": self.dtype}


@dataclass
class OnnxGraph:
    role: str  # "model", or "prefill" / "decode" for causal LMs
    path: Path
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    edge_quant: dict[str, EdgeQuant] = field(default_factory=dict)

    def to_dict(self, root: Path | None = None) -> dict[str, Any]:
        return {
            "role": self.role,
            "file": str(self.path.relative_to(root) if root else self.path),
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "edge_quant": {name: q.to_dict() for name, q in self.edge_quant.items()},
        }


@dataclass
class OnnxExport:
    """Everything :func:`export_onnx` wrote, in the shape the bundle manifest needs."""

    out_dir: Path
    graphs: dict[str, OnnxGraph]
    files: list[Path]
    opset: int
    precision: str  # "fp32" or "qdq"
    exporter: str  # "dynamo", or "torchscript" when the dynamo exporter failed
    seconds: float
    quantization: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def main(self) -> OnnxGraph:
        """The graph a caller runs first: ``model`` or, for LMs, ``prefill``."""
        return self.graphs.get("model") or self.graphs["prefill"]

    @property
    def inputs(self) -> list[TensorInfo]:
        return self.main.inputs

    @property
    def outputs(self) -> list[TensorInfo]:
        return self.main.outputs

    @property
    def total_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.files)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "onnx",
            "opset": self.opset,
            "precision": self.precision,
            "exporter": self.exporter,
            "files": [str(p.relative_to(self.out_dir)) for p in self.files],
            "graphs": {role: g.to_dict(self.out_dir) for role, g in self.graphs.items()},
            "quantization": self.quantization,
            "notes": list(self.notes),
        }


# -- public entry point -----------------------------------------------------------------------
def export_onnx(
    bundle: ModelBundle,
    out_dir: Path,
    calib: list[dict[str, np.ndarray]] | None = None,
    *,
    progress: Progress | None = None,
    decode: bool = True,
) -> OnnxExport:
    """Export ``bundle`` to ONNX under ``out_dir``: fp32 when ``bundle.quant`` is None, else QDQ.

    ``calib`` holds input feeds (graph input name -> array) for calibration; QDQ needs it.
    ``decode=False`` writes a causal LM's prefill graph only (half the export time, for measuring
    prompts: perplexity, prefill latency; a bundle that generates needs the decode graph). Work
    happens in a temporary directory beside ``out_dir``; only finished files are moved in, so a
    failed export leaves ``out_dir`` as it was.
    """
    spec = bundle.quant
    if spec is not None and not isinstance(spec, QuantSpec):
        raise EdgekitError(f"the ONNX exporter reads a QuantSpec plan, got {type(spec).__name__}")
    if spec is not None and not calib:
        raise EdgekitError("a QDQ export needs calibration data (calib is empty)")
    say = progress or (lambda message: log.info(message))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    module = bundle.module.eval()
    is_lm = bundle.task == "causal-lm" and hasattr(module, "prefill") and hasattr(module, "decode")
    with tempfile.TemporaryDirectory(prefix=".onnx-export-", dir=out_dir.parent) as tmp_name:
        tmp = Path(tmp_name)
        final = tmp / "final"
        final.mkdir()
        if is_lm:
            result = _export_lm(bundle, module, tmp, final, spec, calib, say, decode)
        else:
            result = _export_single(bundle, module, tmp, final, spec, calib, say)
        graphs, exporter, quantization, notes = result
        files = []
        for path in sorted(final.iterdir()):
            os.replace(path, out_dir / path.name)
            files.append(out_dir / path.name)
    for graph in graphs.values():
        graph.path = out_dir / graph.path.name
    if bundle.task == "causal-lm" and not is_lm:
        notes.append("causal LM without prefill/decode methods: exported logits only, no KV cache")
    return OnnxExport(
        out_dir=out_dir,
        graphs=graphs,
        files=files,
        opset=OPSET,
        precision="fp32" if spec is None else "qdq",
        exporter=exporter,
        seconds=time.perf_counter() - start,
        quantization=quantization,
        notes=notes,
    )


# -- single-graph models ----------------------------------------------------------------------
def _export_single(
    bundle: ModelBundle,
    module: torch.nn.Module,
    tmp: Path,
    final: Path,
    spec: QuantSpec | None,
    calib: list[dict[str, np.ndarray]] | None,
    say: Progress,
) -> tuple[dict[str, OnnxGraph], str, dict[str, Any], list[str]]:
    names = list(bundle.example_inputs)
    output_names = list(bundle.output_names) or ["output"]
    param_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    external = param_bytes > EXTERNAL_DATA_BYTES
    dynamic = {name: dict(bundle.dynamic_axes[name]) for name in names if name in bundle.dynamic_axes}
    say(f"exporting {bundle.spec} to ONNX (opset {OPSET})")
    fp32 = tmp / "fp32" / "model.onnx"
    exporter, fallback = torch_to_onnx(
        module,
        tuple(bundle.example_inputs[n] for n in names),
        fp32,
        input_names=names,
        output_names=output_names,
        dynamic_axes=dynamic,
        external_data=external,
    )
    notes: list[str] = [fallback] if fallback else []
    quantization: dict[str, Any] = {}
    source = fp32
    if spec is not None:
        assert calib is not None
        say(f"quantizing to QDQ (w{spec.weight_bits}/a{spec.activation_bits}) on {len(calib)} samples")
        source = tmp / "qdq" / "model.onnx"
        anchors = bundle.meta.get("range_anchors", ())
        op_types = bundle.meta.get("onnx_op_types")  # ptq's gemm-inputs scope
        quantization, q_notes = quantize_qdq(
            fp32,
            source,
            spec,
            calib[: spec.samples],
            tmp / "work",
            op_types=op_types,
            anchors=anchors,
        )
        notes += q_notes
    target = final / "model.onnx"
    model = onnx.load(str(source), load_external_data=True)
    _rename_output_dims(model, bundle.dynamic_axes)
    _drop_unused_domains(model)
    _strip_metadata(model)
    if external:
        _save_with_external(model, target, "model.onnx.data")
    else:
        onnx.save_model(model, str(target))
    graph = describe_graph(onnx.load(str(target), load_external_data=False), "model", target)
    return {"model": graph}, exporter, quantization, notes


# -- causal LMs: prefill + decode sharing one weights file -------------------------------------
def _export_lm(
    bundle: ModelBundle,
    module: torch.nn.Module,
    tmp: Path,
    final: Path,
    spec: QuantSpec | None,
    calib: list[dict[str, np.ndarray]] | None,
    say: Progress,
    decode: bool = True,
) -> tuple[dict[str, OnnxGraph], str, dict[str, Any], list[str]]:
    layers = int(module.num_layers)
    kv_heads = int(module.num_kv_heads)
    head_dim = int(module.head_dim)
    example_ids = bundle.example_inputs["input_ids"][:1]
    if example_ids.shape[1] < 2:  # a length-1 example would specialise the sequence axis away
        example_ids = example_ids.repeat(1, 4)
    past_names = [f"past.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    present_names = [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]

    say(f"exporting {bundle.spec} prefill graph (opset {OPSET})")
    prefill_fp32 = tmp / "prefill-fp32" / "prefill.onnx"
    exporter, fallback = torch_to_onnx(
        _Prefill(module).eval(),
        (example_ids,),
        prefill_fp32,
        input_names=["input_ids"],
        output_names=["logits", *present_names],
        dynamic_axes={"input_ids": {1: "sequence"}},
        external_data=True,
    )
    notes = [f"prefill: {fallback}"] if fallback else []
    decode_fp32 = tmp / "decode-fp32" / "decode.onnx"
    if decode:
        say(f"exporting {bundle.spec} decode graph")
        example_past = [torch.zeros(1, kv_heads, 3, head_dim) for _ in past_names]
        exporter_decode, fallback_decode = torch_to_onnx(
            _Decode(module).eval(),
            (example_ids[:, :1], *example_past),
            decode_fp32,
            input_names=["input_ids", *past_names],
            output_names=["logits", *present_names],
            dynamic_axes={name: {2: "past_sequence"} for name in past_names},
            external_data=True,
            nest=1,
        )
        exporter = exporter if exporter == exporter_decode else f"{exporter}+{exporter_decode}"
        notes += [f"decode: {fallback_decode}"] if fallback_decode else []
    quantization: dict[str, Any] = {}
    prefill_src, decode_src = prefill_fp32, decode_fp32
    if spec is not None:
        assert calib is not None
        samples = calib[: spec.samples]
        plan = f"w{spec.weight_bits}/a{spec.activation_bits}"
        op_types = bundle.meta.get("onnx_op_types")  # ptq's gemm-inputs scope
        say(f"quantizing prefill to QDQ ({plan}) on {len(samples)} samples")
        prefill_src = tmp / "prefill-qdq" / "prefill.onnx"
        quantization, q_notes = quantize_qdq(
            prefill_fp32,
            prefill_src,
            spec,
            samples,
            tmp / "work-prefill",
            scope_prefix="model.",
            op_types=op_types,
            anchors=bundle.meta.get("range_anchors", ()),
        )
        notes += q_notes
        if decode:
            decode_overrides, o_notes = _overrides_by_module(prefill_fp32, decode_fp32, spec.overrides, "model.")
            notes += o_notes
            say("building decode calibration feeds from the fp32 prefill graph")
            decode_feeds = decode_calibration_feeds(prefill_fp32, samples, layers)
            say(f"quantizing decode to QDQ on {len(decode_feeds)} decode steps")
            decode_src = tmp / "decode-qdq" / "decode.onnx"
            decode_quant, d_notes = quantize_qdq(
                decode_fp32,
                decode_src,
                spec,
                decode_feeds,
                tmp / "work-decode",
                scope_prefix="model.",
                overrides=decode_overrides,
                op_types=op_types,
            )
            notes += [f"decode: {n}" for n in d_notes]
            quantization["decode_calibration"] = (
                "decode graph calibrated on its own inputs: each calibration text is prefilled (fp32 graph) "
                "on a prefix and the next tokens are decoded against that KV cache"
            )
            quantization["decode_steps"] = decode_quant.get("samples", len(decode_feeds))
    sources = {"prefill": prefill_src, "decode": decode_src} if decode else {"prefill": prefill_src}
    say(f"writing {' + '.join(f'{role}.onnx' for role in sources)} sharing {WEIGHTS_FILE}")
    models = {role: onnx.load(str(path), load_external_data=True) for role, path in sources.items()}
    for model in models.values():
        _drop_unused_domains(model)
        _strip_metadata(model)
    save_sharing_weights(models, final, WEIGHTS_FILE)
    graphs = {
        role: describe_graph(
            onnx.load(str(final / f"{role}.onnx"), load_external_data=False), role, final / f"{role}.onnx"
        )
        for role in models
    }
    return graphs, exporter, quantization, notes


def _overrides_by_module(
    prefill_path: Path, decode_path: Path, overrides: dict[str, TensorOverride], prefix: str
) -> tuple[dict[str, TensorOverride], list[str]]:
    """The prefill graph's overrides keyed by module path, so they find the same tensors in decode.

    Tensor names differ between the two traced graphs; module paths do not. An override on a
    tensor that is no module's output, or on a module decode does not run (the causal-mask add),
    stays with the prefill graph (noted).
    """
    if not overrides:
        return {}, []
    model = onnx.load(str(prefill_path), load_external_data=False)
    by_module = module_outputs(model, module_scopes(model, prefix))
    decode = onnx.load(str(decode_path), load_external_data=False)
    in_decode = module_outputs(decode, module_scopes(decode, prefix))
    module_of: dict[str, str] = {}
    for path, tensor in by_module.items():  # the most specific module producing each tensor
        if len(path) > len(module_of.get(tensor, "")):
            module_of[tensor] = path
    translated, prefill_only = {}, []
    for key, value in overrides.items():
        path = key if key in by_module else module_of.get(key)
        if path is not None and path in in_decode:
            translated[path] = value
        else:
            prefill_only.append(key)
    notes = []
    if prefill_only:
        shown = ", ".join(prefill_only[:3]) + (" ..." if len(prefill_only) > 3 else "")
        notes.append(f"{len(prefill_only)} override(s) apply to the prefill graph only (not in decode): {shown}")
    return translated, notes


class _Prefill(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model.prefill(input_ids))


class _Decode(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model.decode(input_ids, *past))


def decode_calibration_feeds(
    prefill_path: Path, samples: Sequence[dict[str, np.ndarray]], layers: int, steps: int = 2
) -> list[dict[str, np.ndarray]]:
    """Decode-graph inputs from calibration texts: prefill a prefix, then feed the next tokens.

    Uses the fp32 prefill *graph*, so the KV cache seen in calibration is the one onnxruntime
    produces. Each text gives ``steps`` feeds at different past lengths (half and nearly all of it).
    """
    from edgekit.exporters.verify import onnx_session

    session = onnx_session(prefill_path)
    feeds: list[dict[str, np.ndarray]] = []
    for sample in samples:
        ids = np.asarray(sample["input_ids"], dtype=np.int64)[:1]
        length = ids.shape[1]
        if length < 2:
            continue
        cuts = sorted({max(1, length // 2), length - 1})[:steps]
        for cut in cuts:
            outputs = session.run(None, {"input_ids": ids[:, :cut]})
            feed = {"input_ids": ids[:, cut : cut + 1]}
            for i in range(layers):
                feed[f"past.{i}.key"] = outputs[1 + 2 * i]
                feed[f"past.{i}.value"] = outputs[2 + 2 * i]
            feeds.append(feed)
    if not feeds:
        raise EdgekitError("decode calibration needs calibration texts of at least 2 tokens")
    return feeds


# -- torch -> ONNX ------------------------------------------------------------------------------
def torch_to_onnx(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    *,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    external_data: bool,
    nest: int | None = None,
) -> tuple[str, str | None]:
    """Export with the dynamo exporter; fall back to TorchScript (logged) if it fails.

    ``dynamic_axes`` maps input names to ``{axis: name}``; ``nest`` says the module takes its
    inputs from position ``nest`` on as ``*args`` (torch.export wants their shapes as one tuple).
    Returns the exporter used and, after a fallback, why dynamo failed. Both failing is the
    model's problem: one line, EdgekitError.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = [dynamic_axes.get(name, {}) for name in input_names]
    shapes: tuple | None = tuple(flat) if nest is None else (*flat[:nest], tuple(flat[nest:]))
    if not any(flat):
        shapes = None
    placeholders = [f"edgekit_output_{index}" for index in range(len(output_names))]
    try:
        with _quiet():
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=True,
                opset_version=OPSET,
                input_names=input_names,
                output_names=placeholders,
                dynamic_shapes=shapes,
                external_data=external_data,
                optimize=True,
                verbose=False,
            )
        _name_outputs(path, placeholders, output_names)
        return "dynamo", None
    except Exception as dynamo_error:  # the exporter raises many types; report, then try TorchScript
        first = _first_line(dynamo_error)
        log.warning("dynamo ONNX export failed (%s); trying the TorchScript exporter", first)
        for stale in path.parent.iterdir():
            stale.unlink()
        axes = {name: dict(axes) for name, axes in dynamic_axes.items() if axes}
        try:
            with _quiet():
                torch.onnx.export(
                    module,
                    args,
                    str(path),
                    dynamo=False,
                    opset_version=20,  # the TorchScript exporter's last opset
                    input_names=input_names,
                    output_names=output_names,
                    dynamic_axes=axes or None,
                )
        except Exception as script_error:
            second = _first_line(script_error)
            raise EdgekitError(f"ONNX export failed: dynamo: {first}; TorchScript: {second}") from None
        model = onnx.load(str(path), load_external_data=True)
        model = onnx.version_converter.convert_version(model, OPSET)
        onnx.save_model(model, str(path), save_as_external_data=external_data)
        return "torchscript", f"dynamo export failed ({first}); used the TorchScript exporter"


def _name_outputs(path: Path, placeholders: list[str], names: list[str]) -> None:
    """Give the graph outputs their names, moving aside any internal tensor that already has one.

    The dynamo exporter names internal values after the torch ops (an encoder's ``embedding``
    lookup), and naming a graph output the same makes a model onnxruntime refuses.
    """
    model = onnx.load(str(path), load_external_data=False)
    renames = {name: f"{name}.internal" for name in names}
    renames.update(dict(zip(placeholders, names, strict=True)))
    for node in model.graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
        node.output[:] = [renames.get(name, name) for name in node.output]
    for value in [*model.graph.output, *model.graph.value_info, *model.graph.initializer]:
        value.name = renames.get(value.name, value.name)
    onnx.save_model(model, str(path))


@contextlib.contextmanager
def _quiet():
    """The exporters print banners and warnings edgekit's users cannot act on; keep them out."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


_BULKY_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node")


def _strip_metadata(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node stack traces (they are most of a graph file and name local
    paths); the module scopes that reports map ops back to are kept."""
    for node in model.graph.node:
        kept = [p for p in node.metadata_props if p.key not in _BULKY_METADATA]
        if len(kept) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(kept)


def _drop_unused_domains(model: onnx.ModelProto) -> None:
    """ORT's optimiser imports every domain it knows; keep the ones nodes use (and the default)."""
    used = {node.domain or "" for node in model.graph.node} | {""}
    kept = [o for o in model.opset_import if (o.domain or "") in used or o.domain == "ai.onnx"]
    del model.opset_import[:]
    model.opset_import.extend(kept)


def _rename_output_dims(model: onnx.ModelProto, dynamic_axes: dict[str, dict[int, str]]) -> None:
    """Give output axes the names the bundle declares (the exporter names them after inputs' symbols)."""
    for output in model.graph.output:
        for axis, name in dynamic_axes.get(output.name, {}).items():
            dims = output.type.tensor_type.shape.dim
            if axis < len(dims) and not dims[axis].HasField("dim_value"):
                dims[axis].dim_param = name


# -- QDQ -----------------------------------------------------------------------------------------
def quantize_qdq(
    fp32_path: Path,
    out_path: Path,
    spec: QuantSpec,
    feeds: Sequence[dict[str, np.ndarray]],
    work: Path,
    scope_prefix: str = "",
    overrides: dict[str, TensorOverride] | None = None,
    op_types: Sequence[str] | None = None,
    anchors: Sequence[Any] = (),
) -> tuple[dict[str, Any], list[str]]:
    """``quant_pre_process`` + one calibration pass + ``quantize_static(QDQ)`` per ``spec``.

    ``scope_prefix`` is what the export wrapper adds in front of the bundle's module paths (LM
    graphs are traced through a wrapper). ``overrides`` replaces ``spec.overrides`` (the decode
    graph gets the prefill's overrides translated to module paths). ``op_types`` limits
    quantization to those op types (default: every op, full-integer), and then an activation is
    quantized only on its way into them: its other consumers read it in float (see
    :func:`float_for_other_consumers`). ``anchors`` are ranges a torch-side calibration already
    chose (``ptq``'s pt2e program), located here by value (see
    :mod:`edgekit.exporters.onnx_anchors`) and written as fixed overrides. Returns a summary for
    the manifest and notes worth reporting.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    edges_only = op_types is not None
    work.mkdir(parents=True, exist_ok=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    external = _uses_external_data(fp32_path)
    exported = onnx.load(str(fp32_path), load_external_data=False)
    scopes = module_scopes(exported, scope_prefix)
    fixed = resolve_overrides(exported, scopes, spec.overrides if overrides is None else overrides)
    anchored: dict[str, TensorOverride] = {}
    if anchors:
        from edgekit.exporters.onnx_anchors import anchored_overrides

        anchored, anchor_notes = anchored_overrides(fp32_path, anchors)
        notes += anchor_notes
        fixed = {**anchored, **fixed}  # a range the spec names explicitly wins

    pre = work / "pre.onnx"
    notes += _pre_process(fp32_path, pre, external, optimize=True)
    model = onnx.load(str(pre), load_external_data=False)
    lost = sorted(set(fixed) - _tensor_names(model))
    if lost:  # the optimiser renamed tensors that carry learned ranges: keep the graph as exported
        notes.append(f"graph optimisation skipped: it would drop overridden tensors ({', '.join(lost[:3])})")
        _pre_process(fp32_path, pre, external, optimize=False)
        model = onnx.load(str(pre), load_external_data=False)

    fused = fuse_rms_norms(model) if spec.fuse_rms_norm else []
    norm_bits = spec.norm_weight_bits or 16
    if fused:
        notes.append(f"{len(fused)} RMSNorms fused into {FUSED_RMS_NORM} (weights {norm_bits}-bit)")
    norm_weights = list(fused)
    initializers = {init.name for init in model.graph.initializer}
    if spec.norm_weight_bits is not None:
        norm_weights += [
            n.input[1] for n in model.graph.node if n.op_type == "LayerNormalization" and n.input[1] in initializers
        ]
    # A constant operand of a 16-bit elementwise op (a ViT's position table, a mask's constants) is
    # stored at 16 bits too; onnxruntime would otherwise give it the 8-bit weight type.
    constants = {
        name
        for n in model.graph.node
        if n.op_type in _ELEMENTWISE and n.op_type in spec.sixteen_bit_ops
        for name in n.input
        if name in initializers
    }
    if _name_nodes(model) or fused:
        onnx.save_model(model, str(pre))  # the quantizer selects nodes by name
    present = {node.op_type for node in model.graph.node} - _NOT_QUANTIZED - set(spec.float_ops)
    op_types = sorted(present if op_types is None else present & set(op_types))
    excluded = shape_only_nodes(model)
    if edges_only:  # a Gather quantizes its lookup table (an initializer); one on activations stays float
        tables = {init.name for init in model.graph.initializer}
        excluded |= {n.name for n in model.graph.node if n.op_type == "Gather" and n.input[0] not in tables}
    excluded = sorted(excluded)
    # ORT folds a Relu/Clip into the range of the tensor before it (better for accuracy), which
    # would discard a fixed range given for that tensor: keep those activations explicit then.
    activation_inputs = {n.input[0] for n in model.graph.node if n.op_type in ("Relu", "Clip")}
    keep_activations = bool(activation_inputs & set(fixed))
    if keep_activations:
        notes.append("Relu/Clip kept explicit: a fixed range is set on the tensor they read")
    overrides = tensor_overrides(model, spec, fixed, _weight_modules(exported, scopes))
    if anchors:
        from edgekit.exporters.onnx_anchors import weight_overrides

        anchored_weights, weight_notes = weight_overrides(pre, anchors)
        overrides |= anchored_weights
        notes += weight_notes
    for weight in norm_weights:  # symmetric per-tensor, as QNN takes a norm's weight
        overrides[weight] = [{"quant_type": _activation_qtype(norm_bits, signed=True), "symmetric": True}]
    for constant in constants - set(overrides):
        overrides[constant] = [{"quant_type": _activation_qtype(16, signed=True), "symmetric": True}]
    reader = _FeedReader(model, feeds)
    method = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }[spec.calibration]
    calibrator = create_calibrator(
        pre,
        op_types,
        augmented_model_path=str(work / "augmented.onnx"),
        calibrate_method=method,
        use_external_data_format=external,
        extra_options={"symmetric": spec.activation_symmetric},
    )
    calibrator.collect_data(reader)
    ranges = calibrator.compute_data()
    del calibrator
    notes += _fix_ranges(model, ranges)
    cache = work / "calibration.json"
    save_tensors_data(ranges, cache)

    extra_options: dict[str, Any] = {
        "ActivationSymmetric": spec.activation_symmetric,
        "WeightSymmetric": True,
        "ForceQuantizeNoInputCheck": True,
        "MinimumRealRange": MINIMUM_REAL_RANGE,
        "DedicatedQDQPair": False,
        "QDQKeepRemovableActivations": keep_activations,
        "TensorQuantOverrides": overrides,
        # a norm's scale vector has one axis: per-channel means one scale per element
        "QDQOpTypePerChannelSupportToAxis": {op: 0 for op in _NORM_OPS},
    }
    with _quiet():
        quantize_static(
            str(pre),
            str(out_path),
            None,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=op_types,
            nodes_to_exclude=excluded,
            per_channel=spec.weight_per_channel,
            reduce_range=False,
            activation_type=_activation_qtype(spec.activation_bits, signed=False),
            weight_type=_weight_qtype(spec.weight_bits),
            use_external_data_format=external,
            calibrate_method=method,
            extra_options=extra_options,
            calibration_cache_path=str(cache),
        )
    _restore_metadata(out_path, exported)
    unquantized = float_gather_outputs(out_path, fixed)
    if unquantized:
        notes.append(f"{unquantized} Gather output(s) of a per-channel table left float or given their pt2e range")
    if edges_only:
        rewired = float_for_other_consumers(out_path, op_types)
        notes.append(f"{rewired} float consumers of quantized activations read them unquantized")
    summary = {
        "weight_bits": spec.weight_bits,
        "weight_per_channel": spec.weight_per_channel,
        "activation_bits": spec.activation_bits,
        "activation_symmetric": spec.activation_symmetric,
        "calibration": spec.calibration,
        "samples": len(feeds),
        "sixteen_bit_ops": sorted(spec.sixteen_bit_ops),
        "float_ops": sorted(spec.float_ops),
        "fixed_overrides": sorted(set(fixed) - set(anchored)),
        "ranges_from_pt2e": len(anchored),
        "quantized_op_types": op_types,
        "shape_only_nodes": len(excluded),
    }
    return summary, notes


def float_gather_outputs(path: Path, fixed: Mapping[str, TensorOverride] | None = None) -> int:
    """Drop the Q/DQ pair onnxruntime puts on a Gather's output when the table is per-channel.

    onnxruntime's quantizer gives a Gather's output its table's quantization parameters. A table
    quantized per channel (a tied embedding, per-channel for the LM head's MatMul) has one scale per
    vocabulary row, which means nothing for the gathered activation: the QuantizeLinear fails at
    run time ("For per axis quantization, scale must be 1D tensor with size ..."). The Gather then
    feeds its consumers float (the table stays stored once, in 8 bits); an output with a range in
    ``fixed`` (a pt2e quantization point: the embedding feeds a linear layer) keeps its pair with
    that range instead. Returns the pairs removed or re-ranged.
    """
    fixed = fixed or {}
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    nodes = list(graph.node)
    sizes = {init.name: int(np.prod(init.dims)) for init in graph.initializer}
    producers = {out: index for index, node in enumerate(nodes) for out in node.output}
    consumers: dict[str, list[int]] = {}
    for index, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(index)

    def per_axis(index: int | None, op_type: str) -> bool:
        return index is not None and nodes[index].op_type == op_type and sizes.get(nodes[index].input[1], 0) > 1

    dropped: set[int] = set()
    rewire: dict[str, str] = {}
    reranged = 0
    for gather in nodes:
        if gather.op_type != "Gather" or not per_axis(producers.get(gather.input[0]), "DequantizeLinear"):
            continue
        for quantize in consumers.get(gather.output[0], []):
            if not per_axis(quantize, "QuantizeLinear"):
                continue
            if gather.output[0] in fixed:
                _set_pair_range(graph, nodes, quantize, consumers, fixed[gather.output[0]])
                reranged += 1
                continue
            dropped.add(quantize)
            for dequantize in consumers.get(nodes[quantize].output[0], []):
                if nodes[dequantize].op_type == "DequantizeLinear":
                    rewire[nodes[dequantize].output[0]] = gather.output[0]
                    dropped.add(dequantize)
    if not dropped:
        if reranged:
            onnx.save_model(model, str(path))
        return reranged
    if {output.name for output in graph.output} & set(rewire):
        raise EdgekitError("a graph output is a per-channel-quantized Gather; cannot keep it float")
    kept = [node for index, node in enumerate(nodes) if index not in dropped]
    for node in kept:
        node.input[:] = [rewire.get(name, name) for name in node.input]
    del graph.node[:]
    graph.node.extend(kept)
    onnx.save_model(model, str(path))
    return reranged + sum(1 for index in dropped if nodes[index].op_type == "QuantizeLinear")


def _set_pair_range(
    graph: onnx.GraphProto, nodes: list, quantize: int, consumers: dict[str, list[int]], fixed: TensorOverride
) -> None:
    """Give a QuantizeLinear and its DequantizeLinears ``fixed``'s per-tensor range."""
    params = _fixed_override(fixed)
    name = nodes[quantize].output[0]
    scale, zero = f"{name}_fixed_scale", f"{name}_fixed_zero_point"
    graph.initializer.extend(
        [numpy_helper.from_array(params["scale"], scale), numpy_helper.from_array(params["zero_point"], zero)]
    )
    for index in [quantize, *consumers.get(name, [])]:
        node = nodes[index]
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            node.input[1], node.input[2] = scale, zero
            kept = [attribute for attribute in node.attribute if attribute.name != "axis"]
            del node.attribute[:]
            node.attribute.extend(kept)


def float_for_other_consumers(path: Path, op_types: Sequence[str]) -> int:
    """Let nodes outside ``op_types`` read an activation's float value, not its DequantizeLinear.

    onnxruntime's QDQ quantizer routes every consumer of a quantized tensor through its Q/DQ pair;
    pt2e quantizes per edge. In a post-LN transformer the LayerNorm output feeds the next linear
    layer (quantized) *and* the residual add (float): through the pair, the residual stream would
    be rounded to the linear input's int8 grid. Returns how many node inputs were rewired.
    """
    model = onnx.load(str(path), load_external_data=False)
    weights = {init.name for init in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    float_of: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        quantize = producers.get(node.input[0])
        if quantize is not None and quantize.op_type == "QuantizeLinear" and quantize.input[0] not in weights:
            float_of[node.output[0]] = quantize.input[0]
    keep = set(op_types) | {"QuantizeLinear", "DequantizeLinear"}
    rewired = 0
    for node in model.graph.node:
        if node.op_type in keep:
            continue
        for index, name in enumerate(node.input):
            if name in float_of:
                node.input[index] = float_of[name]
                rewired += 1
    for name in sorted({output.name for output in model.graph.output} & set(float_of)):
        _output_float_value(model, name, float_of[name])
        rewired += 1
    if rewired:
        onnx.save_model(model, str(path))
    return rewired


def _output_float_value(model: onnx.ModelProto, output: str, float_name: str) -> None:
    """Make graph output ``output`` (a DequantizeLinear's result) carry the float tensor it was
    quantized from: the output keeps its name, the dequantized copy gets a new one."""
    dequantized = f"{output}_DequantizeLinear_Output"
    renames = {output: dequantized, float_name: output}
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            node.input[index] = renames.get(name, name)
        for index, name in enumerate(node.output):
            node.output[index] = renames.get(name, name)


def _restore_metadata(path: Path, exported: onnx.ModelProto) -> None:
    """Put the exporter's per-node metadata (module scopes) back: pre-processing drops it."""
    meta = {node.name: list(node.metadata_props) for node in exported.graph.node if node.metadata_props}
    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        if node.name in meta and not node.metadata_props:
            node.metadata_props.extend(meta[node.name])
    onnx.save_model(model, str(path))


def _name_nodes(model: onnx.ModelProto) -> bool:
    """Give unnamed nodes unique names; True when any was renamed."""
    taken = {node.name for node in model.graph.node if node.name}
    changed = False
    for index, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name, changed = name, True
            taken.add(name)
    return changed


def _pre_process(source: Path, target: Path, external: bool, optimize: bool) -> list[str]:
    """ORT's pre-processing; symbolic shape inference gives up on some graphs, so retry without it."""
    from onnxruntime.quantization import quant_pre_process

    source, target = source.resolve(), target.resolve()
    options = {
        "skip_optimization": not optimize,
        "save_as_external_data": external,
        "all_tensors_to_one_file": True,
        "external_data_location": f"{target.name}.data" if external else None,
    }
    # onnxruntime writes temporary copies of large models into the working directory: keep them in ours
    try:
        with _quiet(), contextlib.chdir(target.parent):
            quant_pre_process(str(source), str(target), **options)
        return []
    except Exception as error:  # symbolic shape inference raises bare Exceptions on unknown ops
        with _quiet(), contextlib.chdir(target.parent):
            quant_pre_process(str(source), str(target), skip_symbolic_shape=True, **options)
        return [f"symbolic shape inference failed ({_first_line(error)}); used ONNX shape inference only"]


def _activation_qtype(bits: int, signed: bool):
    from onnxruntime.quantization import QuantType

    table = {
        (8, False): QuantType.QUInt8,
        (8, True): QuantType.QInt8,
        (16, False): QuantType.QUInt16,
        (16, True): QuantType.QInt16,
    }
    if (bits, signed) not in table:
        raise EdgekitError(f"ONNX QDQ supports 8- or 16-bit activations, not {bits}")
    return table[(bits, signed)]


def _weight_qtype(bits: int):
    from onnxruntime.quantization import QuantType

    if bits not in (4, 8):
        raise EdgekitError(f"ONNX QDQ supports 4- or 8-bit weights, not {bits}")
    return QuantType.QInt4 if bits == 4 else QuantType.QInt8


def module_scopes(model: onnx.ModelProto, prefix: str = "") -> dict[str, str]:
    """Node name -> the torch module path it was traced from (dynamo's ``name_scopes`` metadata).

    ``prefix`` (an export wrapper's attribute, e.g. ``"model."``) is stripped, so paths read as
    the bundle's ``module.named_modules()`` names. Nodes outside any submodule map to ``""``.
    """
    scopes = {}
    for node in model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        raw = meta.get("pkg.torch.onnx.name_scopes")
        if not raw:
            continue
        try:
            parts = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            continue
        path = parts[-2] if len(parts) >= 2 else ""
        if prefix and path.startswith(prefix):
            path = path[len(prefix) :]
        elif prefix and path == prefix.rstrip("."):
            path = ""
        scopes[node.name] = path
    return scopes


def module_outputs(model: onnx.ModelProto, scopes: dict[str, str]) -> dict[str, str]:
    """Module path -> the graph tensor it outputs (its last float node's first output)."""
    outputs: dict[str, str] = {}
    for node in model.graph.node:  # nodes are topologically sorted: the last one wins
        path = scopes.get(node.name)
        if path and node.op_type not in ("Constant", "Shape"):
            for prefix in _prefixes(path):
                outputs[prefix] = node.output[0]
    return outputs


def _prefixes(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def resolve_overrides(
    model: onnx.ModelProto, scopes: dict[str, str], overrides: dict[str, TensorOverride]
) -> dict[str, TensorOverride]:
    """Override keys as graph tensor names: a key is a tensor name, or a module path meaning its output."""
    names = _tensor_names(model)
    by_module = module_outputs(model, scopes)
    resolved: dict[str, TensorOverride] = {}
    missing = []
    for key, value in overrides.items():
        name = key if key in names else by_module.get(key)
        if name is None:
            missing.append(key)
        else:
            resolved[name] = value
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise EdgekitError(f"quantization overrides name neither a tensor nor a module of the exported graph: {shown}")
    return resolved


def _weight_modules(model: onnx.ModelProto, scopes: dict[str, str]) -> dict[str, str]:
    """Weight initializer -> module path of the Conv/MatMul/Gemm (or Gather: a table) reading it."""
    initializers = {init.name: init for init in model.graph.initializer}
    owners = {}
    for node in model.graph.node:
        found = _weight_and_axis(node, initializers)
        if found is not None:
            weight = found[0]
            owners[weight] = scopes.get(node.name) or (
                weight.rsplit(".", 1)[0] if weight.endswith(".weight") else weight
            )
    return owners


def tensor_overrides(
    model: onnx.ModelProto,
    spec: QuantSpec,
    fixed: dict[str, TensorOverride] | None = None,
    weight_modules: dict[str, str] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """ORT ``TensorQuantOverrides`` for ``spec``: fixed ranges, 16-bit op outputs, per-channel modules.

    ``fixed`` are the spec's overrides with keys resolved to tensor names (default: as given).
    """
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.execution_providers.qnn.mixed_precision_overrides_utils import (
        MixedPrecisionTensorQuantOverridesFixer,
    )
    from onnxruntime.quantization.tensor_quant_overrides import TensorQuantOverridesHelper

    graph = model.graph
    fixed = dict(spec.overrides) if fixed is None else fixed
    missing = sorted(set(fixed) - _tensor_names(model))
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise EdgekitError(f"quantization overrides name tensors the exported graph does not have: {shown}")
    overrides: dict[str, list[dict[str, Any]]] = {}

    # 16-bit outputs for the named op types; the QNN fixer then adds the u8<->u16 conversions
    # that keep every node's inputs and outputs at one type.
    if spec.activation_bits == 8 and spec.sixteen_bit_ops:
        floats = _float_tensors(model)
        for node in graph.node:
            if node.op_type in spec.sixteen_bit_ops:
                for output in node.output:
                    if output in floats and output not in fixed:
                        overrides[output] = [{"quant_type": QuantType.QUInt16}]
        if overrides:
            helper_ = TensorQuantOverridesHelper(overrides)
            fixer = MixedPrecisionTensorQuantOverridesFixer.create_from_model(helper_, model, QuantType.QUInt8)
            fixer.apply(QuantType.QUInt8, spec.activation_symmetric)
            overrides = helper_.get_dict()

    for name, value in fixed.items():
        overrides[name] = [_fixed_override(value)]

    # explicit also under weight_per_channel: a Gather's table has no default axis
    if spec.per_channel_modules or spec.eight_bit_weight_modules:
        initializers = {init.name: init for init in graph.initializer}
        owners = weight_modules or {}
        for node in graph.node:
            found = _weight_and_axis(node, initializers)
            if found is None:
                continue
            weight, axis = found
            owner = owners.get(weight, weight.rsplit(".", 1)[0] if weight.endswith(".weight") else weight)
            if spec.named_per_channel(owner):
                overrides[weight] = [{"axis": axis, "quant_type": _weight_qtype(spec.weight_bits_of(owner))}]
    return overrides


def _fixed_override(fixed: TensorOverride) -> dict[str, Any]:
    qtype = _activation_qtype(fixed.bits, fixed.signed)
    dtype = {(8, False): np.uint8, (8, True): np.int8, (16, False): np.uint16, (16, True): np.int16}[
        (fixed.bits, fixed.signed)
    ]
    info = np.iinfo(dtype)
    if not info.min <= fixed.zero_point <= info.max:
        raise EdgekitError(f"zero point {fixed.zero_point} does not fit {np.dtype(dtype).name}")
    if not (np.isfinite(fixed.scale) and fixed.scale > 0):
        raise EdgekitError(f"quantization scale must be finite and positive, got {fixed.scale}")
    return {
        "quant_type": qtype,
        "scale": np.array(fixed.scale, dtype=np.float32),
        "zero_point": np.array(fixed.zero_point, dtype=dtype),
    }


def _weight_and_axis(node: onnx.NodeProto, initializers: dict[str, TensorProto]) -> tuple[str, int] | None:
    """A Conv/MatMul/Gemm constant weight and its output-channel axis, or a Gather's constant
    table and its row axis; None for other nodes."""
    if node.op_type == "Gather" and node.input[0] in initializers:
        return node.input[0], 0
    if len(node.input) < 2 or node.input[1] not in initializers:
        return None
    weight = node.input[1]
    if node.op_type == "Conv":
        return weight, 0
    if node.op_type == "ConvTranspose":
        return weight, 1
    if node.op_type == "MatMul":
        return weight, len(initializers[weight].dims) - 1
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return weight, 0 if trans_b else 1
    return None


def _fix_ranges(model: onnx.ModelProto, ranges: Any) -> list[str]:
    """Make calibrated ranges usable: finite, and Softmax inputs clamped to their useful top."""
    from onnxruntime.quantization.calibrate import TensorData

    notes = []
    softmax_inputs = {node.input[0] for node in model.graph.node if node.op_type == "Softmax"}
    for name in list(ranges.data):
        data = ranges.data[name]
        low, high = (np.asarray(v, dtype=np.float32) for v in data.range_value)
        if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
            raise EdgekitError(f"calibration saw non-finite values in tensor '{name}' (NaN/inf in the data?)")
        if name in softmax_inputs and low.size == 1 and float(high.max() - low.min()) > SOFTMAX_INPUT_RANGE:
            clamped = (high - SOFTMAX_INPUT_RANGE).astype(np.float32)
            kept = {k: getattr(data, k) for k in data._attrs if k not in ("lowest", "highest")}
            ranges.data[name] = TensorData(lowest=clamped, highest=high, **kept)
            notes.append(
                f"Softmax input '{name}' range [{float(low.min()):.4g}, {float(high.max()):.4g}] clamped to "
                f"[{float(clamped.min()):.4g}, {float(high.max()):.4g}]"
            )
    return notes


class _FeedReader:
    """ORT CalibrationDataReader over a list of feeds, cast to the graph's input dtypes."""

    def __init__(self, model: onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        initializer_names = {init.name for init in model.graph.initializer}
        self.dtypes = {
            i.name: helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
            for i in model.graph.input
            if i.name not in initializer_names
        }
        for index, feed in enumerate(feeds):
            if set(feed) != set(self.dtypes):
                raise EdgekitError(
                    f"calibration sample {index} has inputs {sorted(feed)}, the graph needs {sorted(self.dtypes)}"
                )
        self.feeds = list(feeds)
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.feeds):
            return None
        feed = self.feeds[self.position]
        self.position += 1
        return {name: np.asarray(value, dtype=self.dtypes[name]) for name, value in feed.items()}

    def rewind(self) -> None:
        self.position = 0

    def __len__(self) -> int:
        return len(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.feeds = self.feeds[start_index:end_index]
        self.position = 0


# -- graph facts ---------------------------------------------------------------------------------
def _tensor_names(model: onnx.ModelProto) -> set[str]:
    graph = model.graph
    names = {i.name for i in graph.input} | {o.name for o in graph.output}
    for node in graph.node:
        names.update(node.output)
    return names


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
    graph = model.graph
    infos = list(graph.value_info) + list(graph.input) + list(graph.output)
    return {vi.name for vi in infos if vi.type.tensor_type.elem_type in floats}


def _uses_external_data(path: Path) -> bool:
    model = onnx.load(str(path), load_external_data=False)
    return any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer)


def _shape(value: onnx.ValueInfoProto) -> list[int | str]:
    dims = value.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]


def describe_graph(model: onnx.ModelProto, role: str, path: Path) -> OnnxGraph:
    """Inputs, outputs and edge quantization of a saved graph."""
    graph = model.graph
    initializer_names = {init.name for init in graph.initializer}

    def info(value: onnx.ValueInfoProto) -> TensorInfo:
        dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        return TensorInfo(value.name, np.dtype(dtype).name, _shape(value))

    inputs = [info(i) for i in graph.input if i.name not in initializer_names]
    outputs = [info(o) for o in graph.output]
    return OnnxGraph(role, path, inputs, outputs, edge_quantization(model))


def edge_quantization(model: onnx.ModelProto) -> dict[str, EdgeQuant]:
    """Scale/zero point of the QuantizeLinear reading each graph input and the DQ writing each output."""
    graph = model.graph
    constants = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute:
            constants[node.output[0]] = node.attribute[0].t
    edges: dict[str, EdgeQuant] = {}

    def read(node: onnx.NodeProto) -> EdgeQuant | None:
        if len(node.input) < 3 or node.input[1] not in constants or node.input[2] not in constants:
            return None
        scale = numpy_helper.to_array(constants[node.input[1]])
        zero = numpy_helper.to_array(constants[node.input[2]])
        if scale.size != 1:
            return None
        return EdgeQuant(float(scale.reshape(-1)[0]), int(zero.reshape(-1)[0]), np.dtype(zero.dtype).name)

    inputs = {i.name for i in graph.input}
    outputs = {o.name for o in graph.output}
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in inputs and node.input[0] not in edges:
            edge, tensor = read(node), node.input[0]
        elif node.op_type == "DequantizeLinear" and node.output[0] in outputs:
            edge, tensor = read(node), node.output[0]
        else:
            continue
        if edge is not None:
            edges[tensor] = edge
    return edges


# -- writing graphs whose weights live in one shared file -----------------------------------------
def _save_with_external(model: onnx.ModelProto, path: Path, location: str) -> None:
    save_sharing_weights({path.stem: model}, path.parent, location)


def save_sharing_weights(models: dict[str, onnx.ModelProto], out_dir: Path, weights_name: str) -> Path:
    """Save ``{name}.onnx`` for each model with every large initializer in one ``weights_name`` file.

    Initializers with the same dtype, shape and bytes are written once and referenced by offset
    from every graph, so prefill and decode graphs of one LM cost one copy of the weights. A
    matrix that is the transpose of one already written (the exporter folds ``lm_head = embed.T``
    of a tied LM into a second layout) is not written again either: its graph reads the stored
    layout through a ``Transpose`` node (onnxruntime folds it at load; the file holds one copy).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    weights_path = out_dir / weights_name
    stored: dict[str, _Stored] = {}
    matrices: dict[tuple[int, tuple[int, ...]], list[str]] = {}  # (dtype, dims) -> keys of stored 2-D tensors
    with open(weights_path, "wb") as blob:
        for name, model in models.items():
            for tensor in list(_large_tensors(model)):
                data = _tensor_bytes(tensor)
                key = _content_key(tensor.data_type, list(tensor.dims), data)
                if key not in stored:
                    source = _stored_transpose(tensor, data, stored, matrices)
                    if source is not None:
                        _read_through_transpose(model, tensor, source, weights_name)
                        continue
                    offset = blob.tell()
                    padding = (-offset) % (ALIGN if len(data) >= PAGE_ALIGNED_BYTES else SMALL_ALIGN)
                    blob.write(b"\0" * padding)
                    offset += padding
                    blob.write(data)
                    stored[key] = _Stored(tensor.name, tensor.data_type, list(tensor.dims), offset, len(data))
                    if len(tensor.dims) == 2:
                        matrices.setdefault((tensor.data_type, tuple(tensor.dims)), []).append(key)
                _point_at(tensor, weights_name, stored[key].offset, stored[key].length)
            onnx.save_model(model, str(out_dir / f"{name}.onnx"))
    return weights_path


_PACKED_4BIT = (TensorProto.INT4, TensorProto.UINT4)


@dataclass(frozen=True)
class _Stored:
    """Where one initializer's bytes sit in the shared weights file."""

    name: str
    data_type: int
    dims: list[int]
    offset: int
    length: int


def _content_key(data_type: int, dims: list[int], data: bytes) -> str:
    return hashlib.sha256(f"{data_type}:{dims}:".encode() + data).hexdigest()


def _stored_transpose(
    tensor: TensorProto, data: bytes, stored: dict[str, _Stored], matrices: dict[tuple[int, tuple[int, ...]], list[str]]
) -> _Stored | None:
    """The stored matrix whose transpose ``tensor`` is, if any (checked only when the shapes fit)."""
    if len(tensor.dims) != 2 or not matrices.get((tensor.data_type, tuple(reversed(tensor.dims)))):
        return None
    if tensor.data_type in _PACKED_4BIT:  # two values per byte: the bytes are not the matrix
        return None
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    transposed = np.ascontiguousarray(np.frombuffer(data, dtype=dtype).reshape(tuple(tensor.dims)).T).tobytes()
    return stored.get(_content_key(tensor.data_type, list(reversed(tensor.dims)), transposed))


def _read_through_transpose(model: onnx.ModelProto, tensor: TensorProto, source: _Stored, location: str) -> None:
    """Replace initializer ``tensor`` by ``Transpose`` of ``source``'s bytes in the shared file."""
    graph = model.graph
    shared = TensorProto(name=source.name, data_type=source.data_type, dims=source.dims)
    _point_at(shared, location, source.offset, source.length)
    same_name = [init for init in graph.initializer if init.name == source.name]
    taken = {init.name for init in graph.initializer} | {value.name for value in graph.input}
    if same_name and same_name[0] == shared:  # this graph already reads the stored layout: reuse it
        shared_name, extra = source.name, []
    else:
        shared_name = source.name if source.name not in taken else f"{tensor.name}.transposed_source"
        shared.name = shared_name
        extra = [shared]
    kept = [init for init in graph.initializer if init.name != tensor.name]
    del graph.initializer[:]
    graph.initializer.extend([*kept, *extra])
    transpose = helper.make_node("Transpose", [shared_name], [tensor.name], name=f"{tensor.name}/shared", perm=[1, 0])
    graph.node.insert(0, transpose)


def _large_tensors(model: onnx.ModelProto) -> Iterable[TensorProto]:
    for tensor in model.graph.initializer:
        if tensor.data_type != TensorProto.STRING and _nbytes(tensor) >= INLINE_BYTES:
            yield tensor


def _nbytes(tensor: TensorProto) -> int:
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    return count * np.dtype(dtype).itemsize


def _tensor_bytes(tensor: TensorProto) -> bytes:
    if onnx.external_data_helper.uses_external_data(tensor):
        raise RuntimeError(f"initializer {tensor.name} still refers to external data; load it first")
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    # typed fields (float_data, int32_data, ...): re-encode as raw bytes through numpy
    return numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name).raw_data


def _point_at(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    for typed in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        tensor.ClearField(typed)
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = TensorProto.EXTERNAL


def export_summary(export: OnnxExport) -> str:
    """One JSON document describing ``export`` (what the manifest embeds)."""
    return json.dumps(export.to_dict(), indent=1)


__all__ = [
    "OPSET",
    "EdgeQuant",
    "OnnxExport",
    "OnnxGraph",
    "TensorInfo",
    "describe_graph",
    "edge_quantization",
    "export_onnx",
    "quantize_qdq",
    "save_sharing_weights",
    "tensor_overrides",
    "torch_to_onnx",
]
