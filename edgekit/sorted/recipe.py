"""The ``sorted`` transform: sorted fine-tuning (or its cached result), then a many-depth export.

``apply`` fine-tunes the model with SoFT (every configured depth's loss each step), or loads the
weights of an identical earlier run from the cache (``~/.cache/edgekit/sorted-<key>``, keyed by
the source model's hash and every training setting) or from ``checkpoint`` (a user directory).
A run that stops part-way leaves its resume state beside the entry, and the next run continues it.
The returned bundle's ``meta["sorted"]`` holds what the export needs; :func:`export_format` (the
pipeline's hook for transforms with their own exporter) writes one ONNX bundle holding every
depth and verifies and measures each (see :mod:`edgekit.sorted.export`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekit.cache import atomic_directory, cache_root, file_sha256, is_valid
from edgekit.errors import EdgekitError
from edgekit.models.bundle import ModelBundle
from edgekit.models.llama import CausalLMWithCache
from edgekit.sorted.data import WIKIPEDIA
from edgekit.sorted.train import TrainConfig, TrainResult, load_weights, save_weights, train

CACHE_VERSION = 1
FORMATS = ("onnx",)  # a many-depth bundle is ONNX segments + one head sharing one weights file
PAPER_THRESHOLDS = (0.95, 0.95, 0.9, 0.9, 0.8, 0.8, 0.7)  # Sorted LLaMA, layers 12..36


@dataclass
class Config(TrainConfig):
    """Training budget (see :class:`TrainConfig`) plus what the export measures and ships.

    ``thresholds``: per-token dynamic inference exits at the first depth whose top-token
    probability reaches its threshold; one value per depth (the last, full depth always accepts;
    a value above 1 disables an exit) or one value for all. Unset, the export calibrates them on
    ``calibration_tokens`` of training-split text the fine-tuning never saw (never the eval
    split): the fastest setting whose perplexity there is within ``max_perplexity_ratio`` × the
    full model's (see :mod:`edgekit.sorted.dynamic`). The manifest records them; ``edgekit run
    --depth dynamic`` uses them.
    """

    train: bool = True  # false: export the pretrained model's sub-models as they are (early exit)
    checkpoint: str | None = None  # a directory for the trained weights instead of the cache
    thresholds: list[float] | None = None
    calibration_tokens: int = 1024  # unseen training-split tokens the thresholds are calibrated on
    max_perplexity_ratio: float = 1.05  # calibrated dynamic inference: at most this × full perplexity
    eval_tokens: int = 4096  # held-out Wikipedia tokens for each depth's perplexity in the manifest
    latency_prompt: int = 256  # prompt length of the per-depth prefill latency
    latency_decode: int = 32  # decode steps of the per-depth tokens/s
    compare_size: bool = True  # also export one full-depth bundle, to report the size ratio


def paper_thresholds(count: int) -> list[float]:
    """The paper's exit thresholds for seven depths; otherwise the same 0.95 -> 0.7 spread."""
    if count == len(PAPER_THRESHOLDS):
        return list(PAPER_THRESHOLDS)
    return [round(0.95 - 0.25 * i / max(1, count - 1), 3) for i in range(count)]


def training_settings(config: TrainConfig, num_layers: int) -> TrainConfig:
    """The :class:`TrainConfig` part of a recipe config, depths resolved (what the cache key hashes)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {name: getattr(config, name) for name in names}
    values["depths"] = config.resolved_depths(num_layers)
    return TrainConfig(**values)


def cache_key(source_hash: str, config: TrainConfig) -> str:
    settings = dataclasses.asdict(config)
    settings.pop("save_every", None)  # how often to checkpoint does not change the result
    if config.data != WIKIPEDIA:
        settings["data"] = file_sha256(Path(config.data).expanduser())
    blob = json.dumps({"source": source_hash, "settings": settings, "v": CACHE_VERSION}, sort_keys=True)
    return "sorted-" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def fine_tuned(
    model: CausalLMWithCache,
    tokenizer,
    config: TrainConfig,
    source_hash: str,
    *,
    checkpoint: str | Path | None = None,
    separator_id: int | None = None,
    description: str = "sorted fine-tuning",
) -> tuple[TrainResult, Path]:
    """Train ``model`` in place, or load the finished weights of the same run; returns its record.

    With ``checkpoint`` the weights live there (``model.pt`` + ``training.json``) and the resume
    state in ``checkpoint/resume``; otherwise in the edgekit cache, hash-checked.
    """
    settings = training_settings(config, model.num_layers)
    if checkpoint is not None:
        target = Path(checkpoint).expanduser()
        if target.exists() and not target.is_dir():
            raise EdgekitError(f"checkpoint {target} exists and is not a directory")
        if (target / "model.pt").is_file():
            recorded = load_weights(model, target)
            if recorded.depths != settings.resolved_depths(model.num_layers) or recorded.steps != settings.steps:
                raise EdgekitError(f"{target} holds a run with other depths or steps; use another checkpoint directory")
            return recorded, target
        result = train(
            model, tokenizer, settings, target / "resume", separator_id=separator_id, description=description
        )
        save_weights(model, result, target)
        shutil.rmtree(target / "resume", ignore_errors=True)
        return result, target
    entry = cache_root() / cache_key(source_hash, settings)
    if is_valid(entry):
        return load_weights(model, entry), entry
    resume = entry.with_name(entry.name + ".resume")
    result = train(model, tokenizer, settings, resume, separator_id=separator_id, description=description)
    atomic_directory(entry, lambda tmp: save_weights(model, result, tmp), {"settings": dataclasses.asdict(settings)})
    shutil.rmtree(resume, ignore_errors=True)
    return result, entry


def apply(bundle: ModelBundle, data: object, config: Config) -> ModelBundle:
    """Fine-tune (or load) the sorted model; the exporter then writes every depth in one bundle."""
    module = bundle.module
    if bundle.task != "causal-lm" or not isinstance(module, CausalLMWithCache):
        raise EdgekitError(f"the sorted recipe needs a LLaMA-family causal LM; {bundle.spec} is a {bundle.task}")
    depths = config.resolved_depths(module.num_layers)
    thresholds = list(config.thresholds) if config.thresholds is not None else None
    if thresholds is not None and len(thresholds) not in (1, len(depths)):
        raise EdgekitError(f"thresholds: give one value or one per depth ({len(depths)}), got {len(thresholds)}")
    if thresholds is not None and len(thresholds) == 1:
        thresholds = thresholds * len(depths)
    if config.calibration_tokens < 2 or not config.max_perplexity_ratio >= 1.0:
        raise EdgekitError("calibration_tokens must be at least 2 and max_perplexity_ratio at least 1")
    training: dict[str, Any] = {"trained": False}
    if config.train:
        result, where = fine_tuned(
            module,
            bundle.tokenizer,
            config,
            bundle.source_hash,
            checkpoint=config.checkpoint,
            separator_id=bundle.meta.get("document_separator_id"),
        )
        final = result.history[-1] if result.history else {}
        training = {
            "trained": True,
            "weights": str(where),
            "steps": result.steps,
            "final_losses": final.get("per_depth"),
        }
        if config.data == WIKIPEDIA and config.holdout_tokens:  # calibration text is the held-out tail
            training["holdout_tokens"] = config.holdout_tokens
        elif config.data == WIKIPEDIA:  # the windows it trained on, so calibration text avoids them
            training["windows"] = {
                "batch": config.batch,
                "seq_len": config.seq_len,
                "seed": config.seed,
                "draws": config.steps * config.grad_accum,
            }
    module.cpu().eval()  # trained wherever config.device said; exported from the CPU
    sorted_meta = {
        "depths": depths,
        "thresholds": thresholds,  # None: calibrated by the export
        "calibration_tokens": config.calibration_tokens,
        "max_perplexity_ratio": config.max_perplexity_ratio,
        "training": training,
        "eval_tokens": config.eval_tokens,
        "latency_prompt": config.latency_prompt,
        "latency_decode": config.latency_decode,
        "compare_size": config.compare_size,
    }
    return bundle.replace(simulated=module, meta={**bundle.meta, "sorted": sorted_meta, "depths": depths})


def export_format(
    fmt: str, bundle: ModelBundle, directory: Path, shapes: dict[str, tuple], verify: Any
) -> tuple[Any, list, dict[str, Any]]:
    """The pipeline's hook: every depth in one ONNX bundle, verified and measured per depth.

    ``extra["latency_ms"]`` is the full depth's prefill; every depth's latency is in the manifest.
    """
    from edgekit.sorted.export import sorted_onnx_format

    if fmt not in FORMATS:
        raise EdgekitError(f"the sorted recipe exports {' and '.join(FORMATS)} only, not {fmt}")
    spec, ops, extra = sorted_onnx_format(bundle, directory, shapes, verify)
    extra["latency_ms"] = spec.details["sorted"]["latency"][-1]["prefill_ms"]
    return spec, ops, extra
