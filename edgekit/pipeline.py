"""The export pipeline: load → calibrate → transform → export → verify → check → write the bundle.

Stages are plain functions over an :class:`ExportPlan`, so ``--dry-run`` is the plan alone and a
failure at any stage leaves nothing behind: the bundle is built in a hidden staging directory
next to ``out`` and renamed onto it only when every stage has passed.

A transform whose bundles the generic exporters cannot write (e.g. sorted: every depth in one
bundle) declares it in its module, next to ``Config`` and ``apply``:

- ``FORMATS``: the formats it exports to (default: all of :data:`FORMATS`);
- ``export_format(fmt, bundle, directory, shapes, verify) -> (FormatSpec, ops, extra)``: writes
  ``fmt`` itself. It verifies what it wrote (``verify`` is the recipe's tolerance), so ``extra``
  carries the report's ``verification``, ``quality`` and ``latency_ms``; other keys of ``extra``
  go into the report's format entry as they are.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgekit import __version__, devices, recipes
from edgekit import data as datasets
from edgekit.calibrate import calibration_inputs
from edgekit.errors import EdgekitError
from edgekit.models import ModelBundle
from edgekit.models import load as load_model
from edgekit.progress import step, track
from edgekit.runtime import load as load_bundle
from edgekit.runtime.manifest import FormatSpec, GraphSpec, Manifest, TensorSpec

FORMATS = ("onnx", "pte")


class VerificationError(EdgekitError):
    """The exported file disagrees with the torch model beyond the recipe's tolerance."""


@dataclass
class ExportPlan:
    model: str
    recipe: recipes.Recipe
    device: Any  # devices.DeviceProfile
    out: Path
    formats: list[str]
    calib: str | None = None
    force: bool = False
    baseline: bool = True  # also export fp32 to a scratch dir to measure size and latency ratios
    eval_samples: int = 64

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "recipe": self.recipe.as_dict(),
            "device": self.device.name,
            "formats": self.formats,
            "out": str(self.out),
            "calibration": self.calib or "the model's own data set",
            "replace existing": self.force,
            "fp32 baseline for ratios": self.baseline,
            "evaluation samples": self.eval_samples,
        }


def _check_model_spec(spec: str) -> None:
    """Cheap checks that need no model load, so a dry run catches typos too."""
    from edgekit.models.zoo import zoo_entry

    if spec.startswith("zoo:"):
        zoo_entry(spec[4:])
    elif ("/" in spec or spec.endswith(".pt2")) and not Path(spec).expanduser().exists():
        raise EdgekitError(f"no such model path: {spec}")


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise EdgekitError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise EdgekitError(f"{out} is not empty; pass --force to replace it")


def plan_export(
    model: str,
    recipe: str,
    device: str,
    out: Path,
    fmt: str = "all",
    calib: str | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
    baseline: bool = True,
    eval_samples: int = 64,
) -> ExportPlan:
    """Resolve and validate everything an export needs, without loading the model."""
    resolved_recipe = recipes.load(recipe, recipes.parse_overrides(overrides or []))
    profile = devices.load_profile(device)
    if fmt not in (*FORMATS, "all"):
        raise EdgekitError(f"unknown format '{fmt}' (onnx, pte or all)")
    supported = list(getattr(resolved_recipe.transform_module(), "FORMATS", FORMATS))
    if fmt != "all" and fmt not in supported:
        raise EdgekitError(f"the {resolved_recipe.name} recipe exports {' and '.join(supported)} only (--format ...)")
    formats = supported if fmt == "all" else [fmt]
    _check_model_spec(model)
    _check_out(out, force)
    if eval_samples <= 0:
        raise EdgekitError("--eval-samples must be positive")
    return ExportPlan(model, resolved_recipe, profile, out, formats, calib, force, baseline, eval_samples)


# -- stages ---------------------------------------------------------------------------------------
def _torch_feeds(feeds: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.ascontiguousarray(array)) for name, array in feeds.items()}


@torch.no_grad()
def torch_output(module: torch.nn.Module, feeds: dict[str, np.ndarray]) -> np.ndarray:
    output = module(**_torch_feeds(feeds))
    if isinstance(output, tuple | list):
        output = output[0]
    return output.detach().float().numpy()


@dataclass
class FormatExport:
    """One format's files as the manifest records them, plus the per-op summary of its main graph."""

    spec: FormatSpec
    ops: list
    extra: dict[str, Any] = field(default_factory=dict)  # report facts of a transform's own exporter

    @property
    def self_verified(self) -> bool:
        """Whether the exporter verified and measured its files itself (a transform's own exporter)."""
        return "verification" in self.extra


def _onnx_format(bundle: ModelBundle, directory: Path, calib: list, shapes: dict[str, tuple]) -> FormatExport:
    from edgekit.exporters.onnx import export_onnx
    from edgekit.exporters.onnx_ops import onnx_op_stats

    export = export_onnx(bundle, directory, calib or None)
    graphs = {
        ("main" if role == "model" else role): GraphSpec(
            file=graph.path.name,
            inputs=[TensorSpec(t.name, t.dtype, list(t.shape)) for t in graph.inputs],
            outputs=[TensorSpec(t.name, t.dtype, list(t.shape)) for t in graph.outputs],
        )
        for role, graph in export.graphs.items()
    }
    details = export.to_dict()
    spec = FormatSpec(
        graphs=graphs,
        files=[path.name for path in export.files],
        quantization={role: graph["edge_quant"] for role, graph in details["graphs"].items()},
        details={key: details[key] for key in ("opset", "precision", "exporter", "notes")},
    )
    return FormatExport(spec, onnx_op_stats(export.main.path, shapes))


def _pte_format(bundle: ModelBundle, directory: Path, calib: list) -> FormatExport:
    from edgekit.exporters.executorch import export_pte

    export = export_pte(bundle, directory, calib or None)
    graph = GraphSpec(
        file=export.path.name,
        inputs=[TensorSpec(t.name, t.dtype, list(t.shape)) for t in export.inputs],
        outputs=[TensorSpec(t.name, t.dtype, list(t.shape)) for t in export.outputs],
    )
    summary = export.as_dict()
    spec = FormatSpec(
        graphs={"main": graph},
        files=[path.name for path in export.files],
        details={key: summary[key] for key in ("quantized", "static_shapes", "delegation")},
    )
    return FormatExport(spec, export.ops)


def _export_format(
    fmt: str,
    bundle: ModelBundle,
    directory: Path,
    calib: list,
    shapes: dict[str, tuple],
    recipe: recipes.Recipe | None = None,
) -> FormatExport:
    """``fmt`` by the recipe transform's own ``export_format`` if it has one, else the generic exporter."""
    custom = getattr(recipe.transform_module(), "export_format", None) if recipe is not None else None
    if custom is not None:
        spec, ops, extra = custom(fmt, bundle, directory, shapes, recipe.verify)
        return FormatExport(spec, ops, extra)
    if fmt == "onnx":
        return _onnx_format(bundle, directory, calib, shapes)
    return _pte_format(bundle, directory, calib)


def _format_bytes(directory: Path, spec: FormatSpec) -> int:
    return sum((directory / name).stat().st_size for name in spec.files)


def verify(
    bundle: ModelBundle, directory: Path, fmt: str, samples: list[dict[str, np.ndarray]], recipe: recipes.Recipe
) -> dict[str, Any]:
    """Float vs simulated vs the exported file in its runtime, on the same inputs."""
    from edgekit.exporters.verify import compare, judge

    session = load_bundle(directory, fmt)
    graph = session.graph("prefill" if "prefill" in session.graphs else "main")
    simulated = bundle.simulated_for(fmt)
    float_outputs, simulated_outputs, runtime_outputs = [], [], []
    for feeds in samples:
        fitted = _fit_to_graph(feeds, graph)
        float_outputs.append(torch_output(_float_module(bundle), fitted))
        simulated_outputs.append(torch_output(simulated, fitted))
        runtime_outputs.append(next(iter(session.run(fitted, graph=None).values())))
    stacked = [np.concatenate(outputs, axis=0) for outputs in (float_outputs, simulated_outputs, runtime_outputs)]
    float_out, simulated_out, runtime_out = stacked
    result = {
        "samples": len(samples),
        "runtime_vs_simulated": compare(simulated_out, runtime_out, bundle.task),
        "runtime_vs_float": compare(float_out, runtime_out, bundle.task),
        "simulated_vs_float": compare(float_out, simulated_out, bundle.task),
    }
    failures = judge(result, recipe.verify)
    result["passed"] = not failures
    if failures:
        raise VerificationError(
            f"{fmt} export fails verification: {'; '.join(failures)} "
            f"(recipe tolerance; relax with --set verify.min_sqnr_db=... / verify.float_gap_db=...)"
        )
    return result


def _float_module(bundle: ModelBundle) -> torch.nn.Module:
    """The float reference: the model itself, or the ANN a transform replaced (``meta['float_module']``, SNN)."""
    return bundle.meta.get("float_module", bundle.module)


def _fit_to_graph(feeds: dict[str, np.ndarray], graph) -> dict[str, np.ndarray]:
    """Crop a sample to a static graph's fixed sequence length (ExecuTorch programs are static)."""
    fitted = {}
    for tensor in graph.inputs:
        array = feeds[tensor.name]
        if array.ndim == len(tensor.shape) and array.shape != tuple(
            size if isinstance(size, int) else array.shape[axis] for axis, size in enumerate(tensor.shape)
        ):
            slices = tuple(slice(0, size) if isinstance(size, int) else slice(None) for size in tensor.shape)
            array = array[slices]
        fitted[tensor.name] = array
    return fitted


def _targets_match(prediction: int, target: Any) -> bool:
    if isinstance(target, list | tuple | set | frozenset):
        return prediction in target
    return prediction == int(target)


def evaluate_quality(bundle: ModelBundle, directory: Path, fmt: str, count: int) -> dict[str, Any]:
    """The task's real-data figure for the float torch model and for the exported file."""
    from edgekit.evaluate import cosine, perplexity

    session = load_bundle(directory, fmt)
    graph = session.graph("prefill" if "prefill" in session.graphs else "main")
    if bundle.dataset is None:
        return {}
    if bundle.task == "causal-lm":
        from edgekit.data.wikipedia import token_stream

        tokens = token_stream(bundle.tokenizer, "eval", 64 * count)
        static = isinstance(graph.inputs[0].shape[1], int)
        window = graph.inputs[0].shape[1] if static else 256
        float_ppl = perplexity(lambda ids: torch_output(bundle.module, {"input_ids": ids}), tokens, window, window // 2)
        export_ppl = perplexity(lambda ids: session.run({"input_ids": ids})["logits"], tokens, window, window // 2)
        return {
            "metric": "perplexity",
            "tokens": int(len(tokens)),
            "window": int(window),
            "float": float_ppl,
            "export": export_ppl,
        }
    items = datasets.items(bundle.dataset, "eval", count)
    float_outs, export_outs, targets = [], [], []
    for item in track(items, f"evaluating {fmt} on {bundle.dataset}"):
        feeds = _fit_to_graph({k: v.numpy() for k, v in bundle.preprocess(item.raw).items()}, graph)
        float_outs.append(torch_output(_float_module(bundle), feeds))
        export_outs.append(next(iter(session.run(feeds).values())))
        targets.append(item.target)
    if bundle.task == "classifier" and all(t is not None for t in targets):

        def accuracy(outputs: list[np.ndarray]) -> float:
            hits = [_targets_match(int(o.reshape(-1).argmax()), t) for o, t in zip(outputs, targets, strict=True)]
            return float(np.mean(hits))

        return {
            "metric": "top1_accuracy",
            "samples": len(items),
            "float": accuracy(float_outs),
            "export": accuracy(export_outs),
        }
    reference = [o.reshape(o.shape[0], -1, o.shape[-1])[:, 0] for o in float_outs]
    candidate = [o.reshape(o.shape[0], -1, o.shape[-1])[:, 0] for o in export_outs]
    return {
        "metric": "cosine_to_float",
        "samples": len(items),
        "float": 1.0,
        "export": cosine(np.concatenate(reference), np.concatenate(candidate)),
    }


def _latency(directory: Path, fmt: str, feeds: dict[str, np.ndarray]) -> float:
    session = load_bundle(directory, fmt)
    graph = session.graph("prefill" if "prefill" in session.graphs else "main")
    return session.latency_ms(_fit_to_graph(feeds, graph))


# -- the whole run --------------------------------------------------------------------------------
@dataclass
class ExportResult:
    out: Path
    manifest: Manifest
    report: dict[str, Any] = field(default_factory=dict)


def _language_model_facts(bundle: ModelBundle, directory: Path) -> dict[str, Any] | None:
    if bundle.task != "causal-lm":
        return None
    facts = {
        key: bundle.meta[key] for key in ("num_layers", "num_kv_heads", "head_dim", "vocab_size") if key in bundle.meta
    }
    facts["eos_token_ids"] = list(bundle.meta.get("eos_token_ids", []))
    tokenizer = getattr(bundle.tokenizer, "backend_tokenizer", None)
    if tokenizer is not None:
        tokenizer.save(str(directory / "tokenizer.json"))
        facts["tokenizer"] = "tokenizer.json"
    return facts


def run_export(plan: ExportPlan) -> ExportResult:
    from edgekit.exporters.report import write_report

    with step(f"loading {plan.model}"):
        bundle = load_model(plan.model)
    recipe = plan.recipe.for_model(bundle.module)
    settings = recipe.settings
    samples = int(getattr(settings, "samples", 0) or 0)
    seq_len = int(getattr(settings, "seq_len", 128))
    calib = calibration_inputs(bundle, plan.calib, samples, seq_len) if samples else []
    verify_inputs = calibration_inputs(
        bundle,
        None if plan.calib is None else plan.calib,
        recipe.verify.samples,
        seq_len=min(seq_len, 64),
        split="eval",
    )
    with step(f"transform '{recipe.transform}'"):
        transformed = recipe.transform_module().apply(bundle, calib, settings)

    plan.out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{plan.out.name}.partial-", dir=plan.out.parent))
    scratch = Path(tempfile.mkdtemp(prefix=".edgekit-baseline-"))
    try:
        shapes = {name: tuple(array.shape) for name, array in verify_inputs[0].items()}
        exports: dict[str, FormatExport] = {}
        for fmt in plan.formats:
            with step(f"exporting {fmt}"):
                exports[fmt] = _export_format(fmt, transformed, staging, calib, shapes, recipe)
        formats = {fmt: export.spec for fmt, export in exports.items()}
        manifest = Manifest(
            model={
                "spec": bundle.spec,
                "task": bundle.task,
                "source_hash": bundle.source_hash,
                "description": bundle.description,
                "labels": bundle.labels,
                "dataset": bundle.dataset,
            },
            recipe=recipe.as_dict(),
            device=plan.device.name,
            formats=formats,
            language_model=_language_model_facts(bundle, staging),
            timesteps=transformed.meta.get("timesteps"),
            depths=transformed.meta.get("depths"),
            edgekit_version=__version__,
            created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        )
        manifest.write(staging)

        baseline_formats: dict[str, FormatSpec] = {}
        quantized = transformed.quant is not None
        if plan.baseline and (quantized or "float_module" in transformed.meta):
            float_bundle = dataclasses.replace(bundle, simulated=bundle.module, quant=None)
            for fmt in plan.formats:
                with step(f"fp32 {fmt} baseline for ratios"):
                    baseline_formats[fmt] = _export_format(fmt, float_bundle, scratch, [], shapes).spec
            Manifest(
                model=manifest.model, recipe={"name": "fp32"}, device=plan.device.name, formats=baseline_formats
            ).write(scratch)

        per_format: dict[str, Any] = {}
        for fmt, spec in formats.items():
            own = exports[fmt].extra
            if exports[fmt].self_verified:  # the transform's exporter verified and measured its files
                verification, quality = own["verification"], own["quality"]
            else:
                with step(f"verifying {fmt} (float / simulated / runtime)"):
                    verification = verify(transformed, staging, fmt, verify_inputs, recipe)
                quality = evaluate_quality(transformed, staging, fmt, plan.eval_samples)
            stats = exports[fmt].ops
            size = _format_bytes(staging, spec)
            device_format = "onnx-qdq" if fmt == "onnx" and transformed.quant is not None else fmt
            check = devices.check(stats, size, None, plan.device, device_format)
            cost = devices.estimate(stats, plan.device)
            entry: dict[str, Any] = {
                "files": spec.files,
                "bytes": size,
                "verification": verification,
                "quality": quality,
                "ops": [dataclasses.asdict(stat) for stat in stats],
                "device_check": check.as_dict(),
                "cost_estimate": cost.as_dict(),
            }
            if exports[fmt].self_verified:
                entry.update({k: v for k, v in own.items() if k not in ("verification", "quality")})
            else:
                entry["latency_ms"] = _latency(staging, fmt, verify_inputs[0])
            if fmt in baseline_formats:
                baseline_bytes = _format_bytes(scratch, baseline_formats[fmt])
                entry["baseline"] = {
                    "bytes": baseline_bytes,
                    "latency_ms": _latency(scratch, fmt, verify_inputs[0]),
                }
                entry["size_ratio"] = size / baseline_bytes
                entry["latency_ratio"] = entry["latency_ms"] / entry["baseline"]["latency_ms"]
            per_format[fmt] = entry
        report = {"plan": plan.describe(), "formats": per_format, "manifest": {"created": manifest.created}}
        if "snn" in transformed.meta:  # spike rates, op/energy counts, accuracy per ladder stage
            report["snn"] = transformed.meta["snn"]
        if "mobilequant" in transformed.meta:  # steps, hidden-state MSE before/after, seconds
            report["mobilequant"] = transformed.meta["mobilequant"]
        write_report(staging, manifest, report)
        _replace(staging, plan.out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return ExportResult(plan.out, manifest, report)


def _replace(staging: Path, out: Path) -> None:
    """Move the finished bundle onto ``out``; an existing ``out`` (allowed by --force) goes last."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
