"""Export a student as an adaptable edge bundle: an fp32 ONNX graph whose normalization parameters
are graph inputs (with the trained values as defaults), so the edge can feed a new set per inference
without rebuilding its session, and a manifest that lists them under ``extra["adaptable"]``.

The exported norm layers normalise with the statistics of the batch being classified (CEMA's and
Tent's edge model; BN-adapt for free, forward only): mean and variance over every axis but the
channel, then the adaptable affine ``weight`` and ``bias``. The edge should run batches (a single
frame still works for conv layers: its statistics come from its own pixels).

Graph inputs, not re-created sessions: the swap is one reference assignment on the edge (atomic
for free), costs nothing per update, and onnxruntime cannot constant-fold a graph input into its
neighbouring conv, so the parameters stay float and addressable by name.

The graph takes pixels in [0, 1]: a model trained on standardised inputs gets its normalization
baked in front (:func:`edgekit.cloud.adapter.pixel_input`), and the manifest says so.
"""

from __future__ import annotations

import copy
import datetime
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

import edgekit
from edgekit.cloud.adapter import norm_parameter_names, pixel_input
from edgekit.errors import EdgekitError
from edgekit.models.bundle import ModelBundle
from edgekit.runtime.cema import PARAMS_FILE, encode_params
from edgekit.runtime.manifest import FormatSpec, GraphSpec, Manifest, TensorSpec

MODEL_FILE = "model.onnx"


class BatchStatNorm(torch.nn.Module):
    """BatchNorm with the current batch's statistics, written in plain ops so it exports as such."""

    def __init__(self, layer: torch.nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(layer.weight.detach().clone())
        self.bias = torch.nn.Parameter(layer.bias.detach().clone())
        self.eps = layer.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axes = [0] + list(range(2, x.dim()))
        mean = x.mean(dim=axes, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=axes, keepdim=True)
        shape = [1, -1] + [1] * (x.dim() - 2)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight.view(shape) + self.bias.view(shape)


def with_batch_statistics(module: torch.nn.Module) -> torch.nn.Module:
    """A copy whose affine BatchNorm layers use batch statistics (parameter names unchanged)."""
    module = copy.deepcopy(module).eval()
    for child in list(module.modules()):
        for attr, layer in list(child.named_children()):
            if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm) and layer.affine:
                setattr(child, attr, BatchStatNorm(layer))
    return module


def _export_graph(bundle: ModelBundle, pixel_module: torch.nn.Module, path: Path) -> None:
    """TorchScript-based export without constant folding, so the norm parameters stay initializers
    we can expose (the dynamo exporter's optimizer folds them away); a fraction of a second."""
    module = with_batch_statistics(pixel_module)
    name = bundle.input_names[0]
    out = bundle.output_names[0]
    with warnings.catch_warnings():  # the TorchScript exporter warns it is legacy; it is what keeps names
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module,
            (bundle.example_inputs[name],),
            str(path),
            dynamo=False,
            input_names=[name],
            output_names=[out],
            dynamic_axes={name: {0: "batch"}, out: {0: "batch"}},
            do_constant_folding=False,
        )


def _split_aliases(graph: onnx.GraphProto) -> None:
    """The exporter shares equal tensors through Identity nodes; give each its own initializer."""
    initializers = {init.name: init for init in graph.initializer}
    keep = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in initializers:
            copy = onnx.TensorProto()
            copy.CopyFrom(initializers[node.input[0]])
            copy.name = node.output[0]
            graph.initializer.append(copy)
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def _expose_parameters(model: onnx.ModelProto, state: dict[str, np.ndarray]) -> dict[str, str]:
    """Rename each norm initializer to its torch name and list it as a graph input; returns name map."""
    graph = model.graph
    _split_aliases(graph)
    initializers = {init.name: init for init in graph.initializer}
    used: dict[str, str] = {}
    for torch_name, value in state.items():
        match = torch_name if torch_name in initializers else None
        if match is None:  # the exporter renamed it: find it by value (norm params are distinct enough)
            candidates = [
                name
                for name, init in initializers.items()
                if name not in used.values()
                and tuple(init.dims) == value.shape
                and np.array_equal(numpy_helper.to_array(init), value)
            ]
            if len(candidates) != 1:
                raise EdgekitError(
                    f"cannot find norm parameter '{torch_name}' in the exported graph "
                    f"({len(candidates)} candidates); was it folded away?"
                )
            match = candidates[0]
        used[torch_name] = match
    consumers = [node for node in graph.node]
    for torch_name, onnx_name in used.items():
        init = initializers[onnx_name]
        if onnx_name != torch_name:
            init.name = torch_name
            for node in consumers:
                node.input[:] = [torch_name if item == onnx_name else item for item in node.input]
        graph.input.append(onnx.helper.make_tensor_value_info(torch_name, init.data_type, list(init.dims)))
    return used


def export_adaptable(bundle: ModelBundle, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write ``out_dir`` (atomically) with model.onnx, adaptable.safetensors and manifest.json."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise EdgekitError(f"{out_dir} exists (pass overwrite=True / --force)")
    if bundle.task != "classifier" or len(bundle.example_inputs) != 1:
        raise EdgekitError("CEMA bundles need a one-input classifier")
    module = pixel_input(bundle)  # the graph takes raw pixels, as the edge sees and uploads them
    names = norm_parameter_names(module)
    if not names:
        raise EdgekitError(f"{bundle.spec} has no normalization layers to adapt")
    state = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in module.state_dict().items()}
    params = {name: state[name] for name in names}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        _export_graph(bundle, module, tmp / MODEL_FILE)
        model = onnx.load(str(tmp / MODEL_FILE))
        _expose_parameters(model, params)
        onnx.checker.check_model(model)
        onnx.save(model, str(tmp / MODEL_FILE))
        (tmp / PARAMS_FILE).write_bytes(encode_params(0, params))
        input_name = bundle.input_names[0]
        example = bundle.example_inputs[input_name]
        out = bundle.output_names[0]
        graph = GraphSpec(
            file=MODEL_FILE,
            inputs=[TensorSpec(input_name, "float32", ["batch", *list(example.shape[1:])])],
            outputs=[TensorSpec(out, "float32", ["batch", len(bundle.labels or []) or 10])],
        )
        manifest = Manifest(
            model={
                "spec": bundle.spec,
                "task": bundle.task,
                "source_hash": bundle.source_hash,
                "description": bundle.description,
                "labels": bundle.labels,
            },
            recipe={"name": "cema-adaptable", "transform": "none"},
            device="generic-cpu",
            formats={"onnx": FormatSpec(graphs={"main": graph}, files=[MODEL_FILE, PARAMS_FILE])},
            extra={
                "adaptable": {
                    "method": "cema",
                    "normalization": "batch-statistics",
                    "input": "pixels in [0, 1]",
                    "input_normalization_in_graph": module is not bundle.module,
                    "file": PARAMS_FILE,
                    "parameters": {
                        name: {"shape": list(params[name].shape), "dtype": "float32", "kind": kind}
                        for name, kind in names.items()
                    },
                }
            },
            edgekit_version=getattr(edgekit, "__version__", ""),
            created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        )
        manifest.write(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
