"""Export a sorted model as one ONNX bundle holding every depth, and measure each depth in it.

Graphs (see :mod:`edgekit.runtime.sorted` for how the runtime chains them):

- ``segment_i``: ``(input_ids[1, k] | hidden[1, k, d], past.L.key, past.L.value, ...)`` ->
  ``(hidden_out[1, k, d], present.L.key, present.L.value, ...)`` for the layers between two depths,
  with the causal mask over past + chunk, so one graph serves prefill, decode and catch-up chunks;
- ``head``: ``hidden[1, k, d] -> logits[1, k, V]`` (final norm + LM head, shared by every depth).

All graphs keep their weights in one ``weights.bin`` (identical tensors stored once: the tied
embedding used by the first segment and the head is one copy).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from edgekit.exporters.onnx import WEIGHTS_FILE, describe_graph, save_sharing_weights, torch_to_onnx
from edgekit.models.llama import CausalLMWithCache
from edgekit.runtime.manifest import FormatSpec, GraphSpec, TensorSpec
from edgekit.runtime.sorted import SortedModel, State
from edgekit.sorted.dynamic import DecodeCost, calibrated, exit_statistics, threshold_curve
from edgekit.sorted.model import exit_logits

HEAD = "head"


class SegmentGraph(nn.Module):
    """Layers ``start``..``end`` of ``model`` over a chunk of new positions and their past.

    Positions start at the past length (read from the first past tensor's shape); the chunk
    always gets the causal mask, so the traced graph is right for any chunk and past length.
    """

    def __init__(self, model: CausalLMWithCache, start: int, end: int) -> None:
        super().__init__()
        self.model = model
        self.start, self.end = start, end
        self.eval()

    def forward(self, inputs: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model = self.model
        hidden = model.embed_tokens(inputs) if self.start == 0 else inputs
        past_length, length = past[0].shape[2], hidden.shape[1]
        cos, sin = model._rope(past_length, length)
        mask = model._causal_mask(past_length, length, hidden.dtype)
        cache: list[torch.Tensor] = []
        for offset, layer in enumerate(model.layers[self.start : self.end]):
            hidden, k, v = model._layer(layer, hidden, cos, sin, mask, past[2 * offset], past[2 * offset + 1])
            cache += [k, v]
        return (hidden, *cache)


class HeadGraph(nn.Module):
    """The shared final norm + LM head: every sub-model's last step."""

    def __init__(self, model: CausalLMWithCache) -> None:
        super().__init__()
        self.model = model
        self.eval()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model._head(hidden)


def segments_of(depths: list[int]) -> list[dict[str, Any]]:
    bounds = [0, *depths]
    return [{"graph": f"segment_{i}", "start": bounds[i], "end": bounds[i + 1]} for i in range(len(depths))]


def export_graphs(model: CausalLMWithCache, depths: list[int], out_dir: Path, work: Path) -> dict[str, Path]:
    """Write ``segment_i.onnx`` and ``head.onnx`` sharing ``weights.bin`` into ``out_dir``."""
    kv_heads, head_dim = model.num_kv_heads, model.head_dim
    hidden_size = int(model.config.hidden_size)
    chunk, past_length = 3, 3  # example sizes >= 2, so neither axis is specialised away
    models: dict[str, onnx.ModelProto] = {}
    for segment in segments_of(depths):
        start, end = segment["start"], segment["end"]
        first = start == 0
        example = torch.zeros((1, chunk), dtype=torch.long) if first else torch.zeros((1, chunk, hidden_size))
        input_name = "input_ids" if first else "hidden"
        past_names = [f"past.{layer}.{kind}" for layer in range(start, end) for kind in ("key", "value")]
        present_names = [name.replace("past.", "present.", 1) for name in past_names]
        path = work / segment["graph"] / f"{segment['graph']}.onnx"
        torch_to_onnx(
            SegmentGraph(model, start, end),
            (example, *[torch.zeros(1, kv_heads, past_length, head_dim) for _ in past_names]),
            path,
            input_names=[input_name, *past_names],
            output_names=["hidden_out", *present_names],
            dynamic_axes={input_name: {1: "sequence"}, **{name: {2: "past_sequence"} for name in past_names}},
            external_data=True,
            nest=1,
        )
        models[segment["graph"]] = onnx.load(str(path), load_external_data=True)
    path = work / HEAD / f"{HEAD}.onnx"
    torch_to_onnx(
        HeadGraph(model),
        (torch.zeros((1, chunk, hidden_size)),),
        path,
        input_names=["hidden"],
        output_names=["logits"],
        dynamic_axes={"hidden": {1: "sequence"}},
        external_data=True,
    )
    models[HEAD] = onnx.load(str(path), load_external_data=True)
    for proto in models.values():
        del proto.metadata_props[:]
    save_sharing_weights(models, out_dir, WEIGHTS_FILE)
    return {name: out_dir / f"{name}.onnx" for name in models}


def format_spec(paths: dict[str, Path], out_dir: Path, info: dict[str, Any]) -> FormatSpec:
    graphs = {}
    for name, path in paths.items():
        graph = describe_graph(onnx.load(str(path), load_external_data=False), name, path)
        graphs[name] = GraphSpec(
            file=path.name,
            inputs=[TensorSpec(t.name, t.dtype, list(t.shape)) for t in graph.inputs],
            outputs=[TensorSpec(t.name, t.dtype, list(t.shape)) for t in graph.outputs],
        )
    files = sorted([*(path.name for path in paths.values()), WEIGHTS_FILE])
    return FormatSpec(
        graphs=graphs,
        files=files,
        details={"opset": 21, "precision": "fp32", "exporter": "dynamo", "notes": [], "sorted": info},
    )


# -- measurements in the exported runtime ---------------------------------------------------------
def timing_prompt(length: int) -> np.ndarray:
    """Arbitrary token ids for timing (the values do not change the time); all < 97, valid in any vocabulary."""
    return (np.arange(length, dtype=np.int64) * 31 + 7) % 97


def measure_latency(
    runner: SortedModel, prompt_tokens: int, decode_steps: int, repeats: int = 3
) -> list[dict[str, Any]]:
    """Per depth: prefill of ``prompt_tokens`` (to the first token's logits) and decode ms/token.

    Depths are timed interleaved (round-robin over ``repeats`` rounds, median kept), so load
    changes on a shared machine hit every depth alike and the ratios stay fair.
    """
    runner.load_all()
    prompt = timing_prompt(prompt_tokens)
    timings: dict[int, dict[str, list[float]]] = {d: {"prefill": [], "decode": []} for d in runner.depths}
    for _ in range(repeats):
        for depth in runner.depths:
            state = State()
            started = time.perf_counter()
            hidden = runner.hidden(prompt[None, :], depth, state)
            logits = runner.head(hidden[:, -1:])
            timings[depth]["prefill"].append(time.perf_counter() - started)
            token = int(np.argmax(logits[0, -1]))
            started = time.perf_counter()
            for _ in range(decode_steps):
                hidden = runner.hidden(np.asarray([[token]], dtype=np.int64), depth, state)
                token = int(np.argmax(runner.head(hidden)[0, -1]))
            timings[depth]["decode"].append((time.perf_counter() - started) / decode_steps)
    rows = []
    for depth in runner.depths:
        prefill_ms = float(np.median(timings[depth]["prefill"]) * 1e3)
        decode_ms = float(np.median(timings[depth]["decode"]) * 1e3)
        rows.append(
            {
                "depth": depth,
                "prefill_ms": prefill_ms,
                "prefill_tokens": prompt_tokens,
                "decode_ms_per_token": decode_ms,
                "decode_tokens_per_s": 1e3 / decode_ms,
            }
        )
    return rows


def measure_components(runner: SortedModel, prompt_tokens: int, repeats: int = 8) -> DecodeCost:
    """Median one-token decode time of each segment and of the head after a ``prompt_tokens`` prompt.

    Also a two-position call of every segment, for the marginal cost of the batched catch-up
    (the ratio of the summed extra time to the summed one-position time). Calls are interleaved
    so load changes on a shared machine hit every component alike.
    """
    runner.load_all()
    prompt = timing_prompt(prompt_tokens)
    state = State()
    hidden = {0: prompt[None, :]}
    for index in range(len(runner.segments)):  # every segment's cache filled once, its inputs kept
        out = runner._run_segment(index, hidden[index], state)
        hidden[index + 1] = out
    single = {index: (hidden[index][:, -1:]) for index in range(len(runner.segments))}
    double = {index: (hidden[index][:, -2:]) for index in range(len(runner.segments))}
    one: dict[int, list[float]] = {i: [] for i in single}
    two: dict[int, list[float]] = {i: [] for i in single}
    head: list[float] = []
    last = hidden[len(runner.segments)][:, -1:]
    for _ in range(repeats):
        for index in single:
            for chunk, times in ((single[index], one[index]), (double[index], two[index])):
                trial = State(cache=dict(state.cache))  # the same past every time; the copy is not timed
                started = time.perf_counter()
                runner._run_segment(index, chunk, trial)
                times.append(time.perf_counter() - started)
        started = time.perf_counter()
        runner.head(last)
        head.append(time.perf_counter() - started)
    segment_ms = [float(np.median(one[i]) * 1e3) for i in single]
    extra = sum(float(np.median(two[i]) * 1e3) - segment_ms[i] for i in single)
    return DecodeCost(segment_ms, float(np.median(head) * 1e3), max(0.0, extra / sum(segment_ms)))


def exit_perplexities(
    logits_fn: Callable[[np.ndarray], dict[int, np.ndarray]],
    tokens: np.ndarray,
    window: int = 256,
    stride: int = 128,
    dynamic: dict[str, list[float]] | None = None,
) -> tuple[dict[int, float], dict[str, dict[str, float]]]:
    """Sliding-window perplexity at every depth, and of each dynamic-exit setting, from one pass.

    ``dynamic`` maps a setting's name to its per-depth thresholds; each position is scored by
    the depth it exits at (see :mod:`edgekit.sorted.dynamic`), and the mean exit depth is kept.
    """
    stats = exit_statistics(logits_fn, tokens, window, stride)
    per_depth = {depth: stats.perplexity(depth=depth) for depth in stats.depths}
    settings = {
        name: {"perplexity": stats.perplexity(limits), "mean_exit_depth": stats.mean_exit_depth(limits)}
        for name, limits in (dynamic or {}).items()
    }
    return per_depth, settings


def torch_exit_logits(model: CausalLMWithCache, depths: list[int]) -> Callable[[np.ndarray], dict[int, Any]]:
    """``ids -> {depth: logits}`` of the torch model, every depth from one pass.

    Numpy arrays from a CPU model; from a GPU model, tensors left on the GPU (bfloat16 autocast),
    which :func:`~edgekit.sorted.dynamic.exit_statistics` scores there.
    """
    device = next(model.parameters()).device

    @torch.no_grad()
    def run(ids: np.ndarray) -> dict[int, Any]:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = exit_logits(model, torch.from_numpy(np.ascontiguousarray(ids)).to(device), depths)
        if device.type != "cpu":
            return logits
        return {depth: value.float().numpy() for depth, value in logits.items()}

    return run


# -- the pipeline's ONNX stage for sorted bundles ----------------------------------------------------
def _verify_depths(
    model: CausalLMWithCache, runner: SortedModel, ids: np.ndarray, depths: list[int], task: str
) -> dict:
    """Torch sub-model vs the runtime's, per depth; the pipeline's three-way keys for the full depth.

    The torch float and simulated models are the same here (truncation is exact, nothing is
    quantized), so ``simulated_vs_float`` is an identity and the runtime is checked against both.
    """
    from edgekit.exporters.verify import compare

    reference = torch_exit_logits(model, depths)(ids)
    exported = runner.all_exit_logits(ids)
    per_depth = {str(depth): compare(reference[depth], exported[depth], task) for depth in depths}
    full = per_depth[str(depths[-1])]
    return {
        "samples": 1,
        "tokens": int(ids.shape[1]),
        "runtime_vs_simulated": full,
        "runtime_vs_float": full,
        "simulated_vs_float": compare(reference[depths[-1]], reference[depths[-1]], task),
        "per_depth": per_depth,
    }


def calibration_text(bundle, settings: dict[str, Any]) -> np.ndarray:
    """Training-split (Wikipedia ``calib``) tokens no fine-tuning window covered: threshold calibration text.

    The held-out tail when training kept one (``holdout_tokens``), else the first unseen run.
    """
    from edgekit.sorted.data import held_out_tokens, trained_positions, unseen_span, wikipedia_tokens

    separator = bundle.meta.get("document_separator_id")
    holdout = settings.get("training", {}).get("holdout_tokens", 0)
    if holdout:
        stream = held_out_tokens(bundle.tokenizer, holdout, separator)
    else:
        stream = wikipedia_tokens(bundle.tokenizer, separator)
    windows = settings.get("training", {}).get("windows")
    seen = trained_positions(stream.size, **windows) if windows else np.zeros(stream.size, dtype=bool)
    return unseen_span(stream, seen, settings["calibration_tokens"])


def calibrate_thresholds(
    logits_fn: Callable[[np.ndarray], dict[int, np.ndarray]], text: np.ndarray, cost: DecodeCost, max_ratio: float
) -> dict[str, Any]:
    """The tokens/s-vs-perplexity curve on ``text`` and its fastest point within ``max_ratio``."""
    stats = exit_statistics(logits_fn, text)
    curve = threshold_curve(stats, cost)
    return {
        "text": "Wikipedia calib-split tokens outside every fine-tuning window (never the eval split)",
        "tokens": int(text.size),
        "max_perplexity_ratio": max_ratio,
        "curve": curve,
        "chosen": calibrated(curve, max_ratio),
    }


def sorted_onnx_format(
    bundle, directory: Path, shapes: dict[str, tuple], verify_config, threads: int | None = None
) -> tuple[FormatSpec, list, dict[str, Any]]:
    """Export every depth into ``directory``, then verify and measure each depth in onnxruntime.

    Returns the manifest's format entry (with ``details["sorted"]``: depths, segments,
    thresholds, per-depth latency and held-out perplexity), the op statistics of the full-depth
    path, and the report's extra facts (per-depth verification, bundle size vs one full-depth
    bundle). A depth that disagrees with torch beyond the recipe's tolerance fails the export.
    """
    from edgekit.data.wikipedia import token_stream
    from edgekit.errors import EdgekitError
    from edgekit.exporters.onnx import export_onnx
    from edgekit.exporters.onnx_ops import onnx_op_stats
    from edgekit.progress import step

    settings = bundle.meta["sorted"]
    model: CausalLMWithCache = bundle.module
    depths = list(settings["depths"])
    info: dict[str, Any] = {
        "depths": depths,
        "segments": segments_of(depths),
        "head": HEAD,
        "num_kv_heads": model.num_kv_heads,
        "head_dim": model.head_dim,
        "training": settings.get("training", {}),
    }
    with tempfile.TemporaryDirectory(prefix=".sorted-export-", dir=directory.parent) as tmp:
        with step(f"exporting {len(depths)} segments + head to ONNX"):
            paths = export_graphs(model, depths, directory, Path(tmp))
        runner = SortedModel(directory, info, {name: path.name for name, path in paths.items()}, threads)
        tokens = token_stream(bundle.tokenizer, "eval", max(settings["eval_tokens"], 64))
        with step("verifying every depth (torch vs onnxruntime)"):
            verification = _verify_depths(model, runner, tokens[None, :64], depths, bundle.task)
        failures = [
            f"depth {depth}: SQNR {check['sqnr_db']:.1f} dB"
            for depth, check in verification["per_depth"].items()
            if check["sqnr_db"] < verify_config.min_sqnr_db
            or check.get("top1_agreement", 1.0) < verify_config.min_top1_agreement
        ]
        if failures:
            raise EdgekitError(f"onnx export disagrees with torch: {'; '.join(failures)}")
        with step("timing each segment and the head (one-token decode)"):
            cost = measure_components(runner, settings["latency_prompt"])
        if settings.get("thresholds") is not None:
            info["thresholds"] = list(settings["thresholds"])
        else:
            text = calibration_text(bundle, settings)
            with step(f"calibrating exit thresholds on {text.size} unseen training-split tokens"):
                info["dynamic_calibration"] = calibrate_thresholds(
                    runner.all_exit_logits, text, cost, settings["max_perplexity_ratio"]
                )
            info["thresholds"] = info["dynamic_calibration"]["chosen"]["thresholds"]
        with step(f"perplexity of every depth on {tokens.size} held-out Wikipedia tokens (onnxruntime)"):
            per_depth, dynamic = exit_perplexities(
                runner.all_exit_logits, tokens, dynamic={"default": info["thresholds"]}
            )
            float_per_depth, _ = exit_perplexities(torch_exit_logits(model, depths), tokens)
        with step("timing every depth (prefill and decode)"):
            latency = measure_latency(runner, settings["latency_prompt"], settings["latency_decode"])
        info["latency"] = latency
        info["components_ms"] = {"segments": cost.segment_ms, "head": cost.head_ms, "catch_up": cost.catch_up}
        info["quality"] = [
            {
                "depth": depth,
                "metric": "perplexity",
                "dataset": "wikipedia:eval",
                "tokens": int(tokens.size),
                "value": ppl,
            }
            for depth, ppl in per_depth.items()
        ]
        dynamic["default"]["perplexity_ratio"] = dynamic["default"]["perplexity"] / per_depth[depths[-1]]
        info["dynamic_quality"] = dynamic["default"]
        size = sum(path.stat().st_size for path in [*paths.values(), directory / WEIGHTS_FILE])
        quality = {
            "metric": "perplexity",
            "tokens": int(tokens.size),
            "float": float_per_depth[depths[-1]],
            "export": per_depth[depths[-1]],
            "per_depth": {str(d): {"float": float_per_depth[d], "export": per_depth[d]} for d in depths},
            "dynamic": dynamic["default"],
        }
        extra: dict[str, Any] = {"verification": verification, "quality": quality, "bytes": size}
        if settings.get("compare_size", True):
            with step("exporting one full-depth bundle to compare sizes"):
                plain = dict(bundle.meta)
                plain.pop("sorted")
                scratch = Path(tmp) / "full-depth"
                full = export_onnx(bundle.replace(meta=plain), scratch)
                extra["full_depth_bytes"] = full.total_bytes
                extra["size_ratio"] = size / full.total_bytes
    spec = format_spec(paths, directory, info)
    ops = []
    for name in [*(segment["graph"] for segment in info["segments"]), HEAD]:
        length = int(shapes.get("input_ids", (1, 64))[-1])
        ops += onnx_op_stats(paths[name], {"input_ids": (1, length), "hidden": (1, length, model.config.hidden_size)})
    return spec, ops, extra
