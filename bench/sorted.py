"""SoFT vs SFT vs the pretrained model, at every depth, in torch and in the exported runtime.

    python bench/sorted.py --phase train --method soft   # or sft; both are cached
    python bench/sorted.py --phase measure               # perplexities, export, latencies -> JSON
    python bench/sorted.py --phase quality --device cuda --runs 1e-4:2,3e-4:4   # real budgets, GPU
    python bench/sorted.py --phase quality-plot          # redraw sorted_quality.png from its JSON
    python bench/sorted.py --phase quality-dynamic --stats OUT/sorted_quality_stats.npz

Training runs at a reduced budget (BUDGET below, recorded in the JSON): the machine is a shared
2-core CPU. SFT is the same trainer with only the full depth: same data, steps, optimiser, seed.
The quality phase trains at real budgets where a GPU is (``quality``'s docstring).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgekit.models.llama import CausalLMWithCache  # noqa: E402
from edgekit.models.smollm2 import load_hf, source_hash  # noqa: E402
from edgekit.sorted.recipe import Config, fine_tuned  # noqa: E402

RESULTS = REPO / "bench" / "results" / "sorted.json"
# Reduced budget (the recipe default is 60 steps x 4 x 128): what this shared machine affords.
BUDGET = {"steps": 32, "batch": 2, "seq_len": 128, "grad_accum": 1, "lr": 1e-4}


def method_config(method: str, num_layers: int, steps: int | None = None) -> Config:
    config = Config(**{**BUDGET, **({"steps": steps} if steps else {})})
    if method == "sft":
        config.depths = [num_layers]
    return config


def trained(method: str, steps: int | None = None) -> tuple[CausalLMWithCache, dict]:
    hf_model, tokenizer, entry = load_hf()
    model = CausalLMWithCache(hf_model)
    config = method_config(method, model.num_layers, steps)
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    result, where = fine_tuned(
        model, tokenizer, config, source_hash(entry), separator_id=endoftext, description=f"{method} training"
    )
    return model, {"weights": str(where), "seconds": result.seconds, "history": result.history}


EVAL_TOKENS = 1024  # held-out Wikipedia tokens (window 256, stride 128): reduced from the zoo's 8192 (CPU time)
CALIBRATION_TOKENS = 1024  # Wikipedia calib-split tokens no training window covered (thresholds only)
MAX_PERPLEXITY_RATIO = 1.05
CURVE_MAX_RATIO = 1e6  # the reported curve walks on as long as a move saves time, however costly in perplexity
CURVE_POINTS_TIMED = 5  # curve points (besides full, paper and calibrated) whose tokens/s is measured
GENERATE_TOKENS = 16


def _rss_mb_after_loading(directory: Path, files: list[str]) -> float:
    """Resident memory (MB) a fresh process gains by opening ``files`` as onnxruntime sessions."""
    code = (
        "import sys, resource, onnxruntime as ort\n"
        "def rss():\n"
        "    return int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize() / 1e6\n"
        "before = rss(); o = ort.SessionOptions(); o.log_severity_level = 3\n"
        "s = [ort.InferenceSession(f, o, providers=['CPUExecutionProvider']) for f in sys.argv[1:]]\n"
        "print(rss() - before)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *[str(directory / name) for name in files]],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(result.stdout.strip().splitlines()[-1])


def _prompts(tokenizer, count: int = 1, length: int = 64) -> list[list[int]]:
    from edgekit.data.wikipedia import token_stream

    stream = token_stream(tokenizer, "eval", count * length * 4)
    return [stream[i * length * 4 : i * length * 4 + length].tolist() for i in range(count)]


def measure(steps: int | None, lean: bool = False) -> dict:
    """Everything (``lean=False``); or, ``lean``, only what the SoFT bundle's size and its calibrated
    dynamic inference need (no SFT/pretrained perplexities, no per-depth latency table): the
    machine may be too loaded for the full run."""
    import numpy as np

    from edgekit.data.wikipedia import token_stream
    from edgekit.exporters.onnx import export_onnx
    from edgekit.models import smollm2
    from edgekit.runtime.sorted import SortedModel
    from edgekit.sorted.data import trained_positions, unseen_span, wikipedia_tokens
    from edgekit.sorted.dynamic import calibrated, exit_statistics, threshold_curve
    from edgekit.sorted.export import (
        export_graphs,
        measure_components,
        measure_latency,
        segments_of,
        torch_exit_logits,
    )
    from edgekit.sorted.model import default_depths
    from edgekit.sorted.recipe import PAPER_THRESHOLDS

    torch.set_num_threads(2)
    soft, soft_record = trained("soft", steps)
    sft, sft_record = trained("sft", steps) if not lean else (None, None)
    pretrained = CausalLMWithCache(load_hf()[0]) if not lean else None
    tokenizer = load_hf()[1]
    depths = default_depths(soft.num_layers)
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    tokens = token_stream(tokenizer, "eval", EVAL_TOKENS, endoftext)
    perplexity: dict[str, dict[str, float]] = {}
    soft_eval = None
    models = (("soft", soft),) if lean else (("pretrained", pretrained), ("sft", sft), ("soft", soft))
    for name, model in models:
        print(f"perplexity at every depth: {name}", flush=True)
        stats = exit_statistics(torch_exit_logits(model, depths), tokens)
        perplexity[name] = _per_depth(stats, depths)
        if name == "soft":
            soft_eval = stats
    # calibration text: the training split's tokens outside every window SoFT/SFT trained on
    stream = wikipedia_tokens(tokenizer, endoftext)
    config = method_config("soft", soft.num_layers, steps)
    seen = trained_positions(stream.size, config.batch, config.seq_len, config.seed, config.steps * config.grad_accum)
    calibration_tokens = unseen_span(stream, seen, CALIBRATION_TOKENS)
    print("exit statistics of SoFT on the calibration text", flush=True)
    soft_calibration = exit_statistics(torch_exit_logits(soft, depths), calibration_tokens)
    partial = {"depths": depths, "eval_tokens": int(tokens.size), "perplexity": perplexity}
    RESULTS.with_name("sorted.partial.json").write_text(json.dumps(partial, indent=1))

    work = Path(tempfile.mkdtemp(prefix="sorted-bench-"))
    try:
        print("exporting the SoFT model (segments + head)", flush=True)
        paths = export_graphs(soft, depths, work / "bundle", work / "tmp")
        info = {
            "depths": depths,
            "segments": segments_of(depths),
            "head": "head",
            "num_kv_heads": soft.num_kv_heads,
            "head_dim": soft.head_dim,
        }
        runner = SortedModel(work / "bundle", info, {name: path.name for name, path in paths.items()}, threads=2)
        reference = torch_exit_logits(soft, depths)(tokens[None, :64])
        exported = runner.all_exit_logits(tokens[None, :64])
        agreement = {
            str(d): {
                "max_abs": float(np.max(np.abs(reference[d] - exported[d]))),
                "top1_agreement": float(np.mean(reference[d].argmax(-1) == exported[d].argmax(-1))),
            }
            for d in depths
        }
        latency = []
        if not lean:
            print("timing every depth in onnxruntime", flush=True)
            latency = measure_latency(runner, 256, GENERATE_TOKENS, repeats=3)
        print("timing each segment and the head; calibrating thresholds", flush=True)
        cost = measure_components(runner, 256)
        curve = threshold_curve(soft_calibration, cost, max_ratio=CURVE_MAX_RATIO)
        chosen = calibrated(curve, MAX_PERPLEXITY_RATIO)
        step = max(1, len(curve) // CURVE_POINTS_TIMED)
        timed = {f"curve point {i}": point["thresholds"] for i, point in enumerate(curve) if i and i % step == 0}
        settings = {
            "full depth 30": None,
            "calibrated (<= 1.05x on calibration text)": chosen["thresholds"],
            "paper (0.95..0.7)": list(PAPER_THRESHOLDS),
            **timed,
        }
        print(f"timing dynamic inference: {len(settings)} settings", flush=True)
        prompts = _prompts(tokenizer)
        seconds = {name: 0.0 for name in settings}
        generated = {name: 0 for name in settings}
        depth_sums = {name: 0.0 for name in settings}
        for _ in range(2):  # interleaved rounds: load changes hit every setting alike
            for prompt in prompts:
                for name, thresholds in settings.items():
                    if thresholds is None:
                        result = runner.generate(prompt, GENERATE_TOKENS, depth=depths[-1])
                    else:
                        result = runner.generate(prompt, GENERATE_TOKENS, depth="dynamic", thresholds=thresholds)
                    seconds[name] += result.seconds
                    generated[name] += len(result.tokens)
                    depth_sums[name] += sum(result.depths)
        full_rate = generated["full depth 30"] / seconds["full depth 30"]
        full_eval = soft_eval.perplexity()
        full_calibration = soft_calibration.perplexity()
        dynamic_rows = []
        for name, thresholds in settings.items():
            limits = thresholds if thresholds is not None else [2.0] * (len(depths) - 1) + [0.0]
            rate = generated[name] / seconds[name]
            dynamic_rows.append(
                {
                    "setting": name,
                    "thresholds": limits,
                    "tokens_per_s": rate,
                    "speedup_vs_full": rate / full_rate,
                    "predicted_speedup": cost.full_ms() / cost.per_token_ms(soft_calibration, limits),
                    "mean_exit_depth_generating": depth_sums[name] / generated[name],
                    "calibration_perplexity_vs_full": soft_calibration.perplexity(limits) / full_calibration,
                    "perplexity": soft_eval.perplexity(limits),
                    "perplexity_vs_full": soft_eval.perplexity(limits) / full_eval,
                    "mean_exit_depth_eval": soft_eval.mean_exit_depth(limits),
                }
            )
        curve_rows = [
            {
                **point,
                "eval_perplexity_vs_full": soft_eval.perplexity(point["thresholds"]) / full_eval,
                "eval_mean_exit_depth": soft_eval.mean_exit_depth(point["thresholds"]),
            }
            for point in curve
        ]
        sorted_files = [path.name for path in paths.values()]
        sorted_bytes = (
            sum(path.stat().st_size for path in paths.values()) + (work / "bundle" / "weights.bin").stat().st_size
        )
        print("exporting one full-depth bundle (prefill + decode) for the size comparison", flush=True)
        bundle = smollm2.load()
        bundle.module.hf_model.load_state_dict(soft.hf_model.state_dict())
        full = export_onnx(bundle, work / "full")
        full_bytes = full.total_bytes  # before the scratch directory goes
        memory = {
            "sorted_all_depths_mb": _rss_mb_after_loading(work / "bundle", sorted_files),
            "full_depth_prefill_and_decode_mb": _rss_mb_after_loading(work / "full", ["prefill.onnx", "decode.onnx"]),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    by_depth = {row["depth"]: row for row in latency}
    calibrated_row = dynamic_rows[1]
    if lean:
        goals = {
            "dynamic_calibrated_speedup_ge_1.3": calibrated_row["speedup_vs_full"],
            "dynamic_calibrated_eval_perplexity_ratio_le_1.05": calibrated_row["perplexity_vs_full"],
            "bundle_size_ratio_le_1.05": sorted_bytes / full_bytes,
        }
        met = {
            "dynamic_calibrated_ge_1.3x_within_5pct": goals["dynamic_calibrated_speedup_ge_1.3"] >= 1.3
            and goals["dynamic_calibrated_eval_perplexity_ratio_le_1.05"] <= 1.05,
            "bundle_size_ratio_le_1.05": goals["bundle_size_ratio_le_1.05"] <= 1.05,
        }
    else:
        sft_full = perplexity["sft"][str(depths[-1])]
        goals, met = full_goals(perplexity, sft_full, by_depth, calibrated_row, sorted_bytes / full_bytes)
    return {
        "run": "lean: SoFT size + dynamic inference only" if lean else "full",
        "budget": {
            **BUDGET,
            **({"steps": steps} if steps else {}),
            "data": "Wikipedia excerpt, non-eval articles (calib split)",
            "note": "reduced budget for a shared 2-core CPU; the recipe default is 60 steps x 4 x 128",
        },
        "training_seconds": {
            name: record["seconds"] for name, record in (("soft", soft_record), ("sft", sft_record)) if record
        },
        "final_train_loss": {
            name: record["history"][-1]["per_depth"] if record["history"] else None
            for name, record in (("soft", soft_record), ("sft", sft_record))
            if record
        },
        "eval": {"dataset": "wikipedia eval split", "tokens": int(tokens.size), "window": 256, "stride": 128},
        "depths": depths,
        "perplexity": perplexity,
        "runtime_vs_torch_soft": agreement,
        "latency_onnxruntime_2_threads": latency,
        "dynamic": dynamic_rows,
        "dynamic_calibration": {
            "text": "Wikipedia calib-split tokens outside every SoFT/SFT training window (never the eval split)",
            "tokens": int(calibration_tokens.size),
            "max_perplexity_ratio": MAX_PERPLEXITY_RATIO,
            "components_ms": {"segments": cost.segment_ms, "head": cost.head_ms, "catch_up": cost.catch_up},
            "curve": curve_rows,
            "perplexity_measure": "teacher-forced sliding windows (256/128); each position scored by the "
            "distribution of the depth it exits at (exact KV cache: a depth's state depends only on the prefix)",
        },
        "bundle_bytes": {"all_depths": sorted_bytes, "one_full_depth": full_bytes},
        "onnxruntime_rss_mb": memory,
        "goals": goals,
        "goals_met": met,
    }


def full_goals(perplexity: dict, sft_full: float, by_depth: dict, calibrated_row: dict, size_ratio: float):
    goals = {
        "soft_24_le_1.10x_sft_full": perplexity["soft"]["24"] / sft_full,
        "soft_15_le_1.5x_sft_full": perplexity["soft"]["15"] / sft_full,
        "sft_early_exit_15_x_sft_full": perplexity["sft"]["15"] / sft_full,
        "sft_early_exit_24_x_sft_full": perplexity["sft"]["24"] / sft_full,
        "decode_15_speedup_ge_1.8": by_depth[30]["decode_ms_per_token"] / by_depth[15]["decode_ms_per_token"],
        "dynamic_calibrated_speedup_ge_1.3": calibrated_row["speedup_vs_full"],
        "dynamic_calibrated_eval_perplexity_ratio_le_1.05": calibrated_row["perplexity_vs_full"],
        "bundle_size_ratio_le_1.05": size_ratio,
    }
    met = {
        "soft_24_le_1.10x_sft_full": goals["soft_24_le_1.10x_sft_full"] <= 1.10,
        "soft_15_le_1.5x_sft_full": goals["soft_15_le_1.5x_sft_full"] <= 1.5,
        "decode_15_speedup_ge_1.8": goals["decode_15_speedup_ge_1.8"] >= 1.8,
        "dynamic_calibrated_ge_1.3x_within_5pct": goals["dynamic_calibrated_speedup_ge_1.3"] >= 1.3
        and goals["dynamic_calibrated_eval_perplexity_ratio_le_1.05"] <= 1.05,
        "bundle_size_ratio_le_1.05": goals["bundle_size_ratio_le_1.05"] <= 1.05,
    }
    return goals, met


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (axis, curve) = plt.subplots(1, 2, figsize=(11, 4))
    depths = results["depths"]
    for name, label in (("pretrained", "pretrained, early exit"), ("sft", "SFT, early exit"), ("soft", "SoFT")):
        if name in results["perplexity"]:
            axis.plot(depths, [results["perplexity"][name][str(d)] for d in depths], marker="o", label=label)
    if "sft" in results["perplexity"]:
        axis.axhline(results["perplexity"]["sft"][str(depths[-1])], color="grey", linestyle="--", label="SFT full")
    points = results["dynamic_calibration"]["curve"]
    curve.plot(
        [p["eval_perplexity_vs_full"] for p in points],
        [p["predicted_speedup"] for p in points],
        "o-",
        label="predicted",
    )
    measured = results["dynamic"]
    curve.scatter([r["perplexity_vs_full"] for r in measured], [r["speedup_vs_full"] for r in measured], color="red")
    for row in measured:
        curve.annotate(row["setting"].split(" (")[0], (row["perplexity_vs_full"], row["speedup_vs_full"]), fontsize=7)
    curve.axvline(1.05, color="grey", linestyle="--")
    curve.set_xscale("log")
    curve.set_xlabel("eval perplexity / full model")
    curve.set_ylabel("decode tokens/s / full model")
    curve.set_title("dynamic inference: predicted curve, measured points (red)")
    axis.set_yscale("log")
    axis.set_xlabel("sub-model depth (layers)")
    axis.set_ylabel("held-out Wikipedia perplexity")
    axis.set_title(f"SmolLM2-135M, {results['budget']['steps']} training steps")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


QUALITY_RESULTS = REPO / "bench" / "results" / "sorted_quality.json"
QUALITY_DEFAULTS = {"batch": 16, "seq_len": 512, "holdout": 8192, "eval_tokens": 32768}


def _per_depth(stats, depths: list[int]) -> dict[str, float]:
    """Each fixed sub-model's perplexity from one text's exit statistics."""
    return {str(depth): stats.perplexity(depth=depth) for depth in depths}


def _depth_summary(stats: dict, depths: list[int]) -> dict:
    return {text: _per_depth(value, depths) for text, value in stats.items()}


def quality(device: str, runs: list[tuple[float, float]], out: Path, max_minutes: float, **settings: int) -> dict:
    """SoFT vs SFT at real budgets (``runs``: (lr, epochs) pairs), each depth's perplexity in torch.

    For a machine with a GPU: per run, both methods train from the pretrained model on the same
    batches (training split minus a held-out tail), then every depth is scored on held-out eval
    text and on that tail (the text dynamic-inference thresholds are calibrated on). Writes
    ``out/sorted_quality.json`` and the SoFT models' per-position exit statistics
    (``sorted_quality_stats.npz``, for ``--phase quality-dynamic`` to price on this CPU) after every run,
    so a run cut short by ``max_minutes`` keeps what finished. ``settings`` override
    :data:`QUALITY_DEFAULTS`.
    """
    import time

    import numpy as np

    from edgekit.data.wikipedia import token_stream
    from edgekit.sorted.data import held_out_tokens, wikipedia_tokens
    from edgekit.sorted.dynamic import exit_statistics
    from edgekit.sorted.export import torch_exit_logits
    from edgekit.sorted.model import default_depths
    from edgekit.sorted.train import TrainConfig, train

    started = time.perf_counter()
    defaults = {**QUALITY_DEFAULTS, **settings}
    hf_model, tokenizer, _ = load_hf()
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    texts = {
        "eval": token_stream(tokenizer, "eval", defaults["eval_tokens"], endoftext),
        "holdout": held_out_tokens(tokenizer, defaults["holdout"], endoftext),
    }
    train_tokens = wikipedia_tokens(tokenizer, endoftext, defaults["holdout"]).size
    depths = default_depths(hf_model.config.num_hidden_layers)

    def scored(model: CausalLMWithCache) -> dict:
        logits = torch_exit_logits(model, depths)
        return {name: exit_statistics(logits, tokens) for name, tokens in texts.items()}

    pretrained = CausalLMWithCache(hf_model).to(device)
    results: dict = {
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else device,
        "torch": torch.__version__,
        "budget": {**defaults, "train_tokens": int(train_tokens), "depths": depths},
        "perplexity": {"pretrained": _depth_summary(scored(pretrained), depths)},
        "runs": [],
    }
    del pretrained, hf_model
    arrays: dict[str, np.ndarray] = {}
    for lr, epochs in runs:
        if time.perf_counter() - started > max_minutes * 60:
            print(f"stopping before lr={lr} epochs={epochs}: past {max_minutes} minutes", flush=True)
            break
        steps = max(1, round(epochs * train_tokens / (defaults["batch"] * defaults["seq_len"])))
        run: dict = {"lr": lr, "epochs": epochs, "steps": steps}
        for method in ("sft", "soft"):
            model = CausalLMWithCache(load_hf()[0])
            config = TrainConfig(
                depths=[model.num_layers] if method == "sft" else None,
                steps=steps,
                batch=defaults["batch"],
                seq_len=defaults["seq_len"],
                lr=lr,
                warmup=max(4, steps // 20),
                holdout_tokens=defaults["holdout"],
                device=device,
                save_every=steps,
            )
            work = Path(tempfile.mkdtemp(prefix=f"quality-{method}-"))
            try:
                result = train(model, tokenizer, config, work, separator_id=endoftext, description=f"{method} lr {lr}")
            finally:
                shutil.rmtree(work, ignore_errors=True)
            model.eval()
            stats = scored(model)
            run[method] = {
                "seconds": result.seconds,
                "tokens_per_s": steps * defaults["batch"] * defaults["seq_len"] / result.seconds,
                "loss_every_10_steps": [row["per_depth"] for row in result.history[9::10]],
                "perplexity": _depth_summary(stats, depths),
            }
            if method == "soft":
                for text, value in stats.items():
                    arrays[f"lr{lr}_ep{epochs}_{text}_confidence"] = value.confidence
                    arrays[f"lr{lr}_ep{epochs}_{text}_nll"] = value.nll
            del model
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        sft_full = run["sft"]["perplexity"]["eval"][str(depths[-1])]
        soft_eval = run["soft"]["perplexity"]["eval"]
        run["goals"] = {
            "soft_24_x_sft_full": soft_eval["24"] / sft_full,
            "soft_15_x_sft_full": soft_eval["15"] / sft_full,
            "sft_early_exit_24_x_sft_full": run["sft"]["perplexity"]["eval"]["24"] / sft_full,
            "sft_early_exit_15_x_sft_full": run["sft"]["perplexity"]["eval"]["15"] / sft_full,
        }
        results["runs"].append(run)
        results["seconds"] = time.perf_counter() - started
        out.mkdir(parents=True, exist_ok=True)
        (out / QUALITY_RESULTS.name).write_text(json.dumps(results, indent=1))
        np.savez_compressed(out / "sorted_quality_stats.npz", **arrays)
        print(json.dumps({"lr": lr, "epochs": epochs, "steps": steps, **run["goals"]}), flush=True)
    plot_quality(results, out / QUALITY_RESULTS.with_suffix(".png").name)
    return results


def price_quality_runs(stats_files: list[Path]) -> None:
    """Dynamic inference for the quality runs' SoFT models, from their saved exit statistics.

    Thresholds are calibrated on the held-out tail and priced with the one-token segment and head
    costs that ``--phase measure --lean`` measured in onnxruntime on this CPU (the costs do not
    depend on the weights' values). Adds a ``dynamic`` entry to each run in sorted_quality.json.
    """
    import numpy as np

    from edgekit.sorted.dynamic import DecodeCost, ExitStats, calibrated, threshold_curve

    results = json.loads(QUALITY_RESULTS.read_text())
    components = json.loads(RESULTS.with_name("sorted_dynamic.json").read_text())["dynamic_calibration"]
    measured = components["components_ms"]
    cost = DecodeCost(measured["segments"], measured["head"], measured["catch_up"])
    arrays = {}
    for path in stats_files:
        with np.load(path) as loaded:
            arrays.update({key: loaded[key] for key in loaded.files})
    depths = results["budget"]["depths"]
    for run in results["runs"]:
        key = f"lr{run['lr']}_ep{run['epochs']}"
        stats = {
            text: ExitStats(depths, arrays[f"{key}_{text}_confidence"], arrays[f"{key}_{text}_nll"])
            for text in ("eval", "holdout")
        }
        curve = threshold_curve(stats["holdout"], cost, max_ratio=CURVE_MAX_RATIO)
        chosen = calibrated(curve, MAX_PERPLEXITY_RATIO)
        full = stats["eval"].perplexity()
        run["dynamic"] = {
            "costs": "one-token onnxruntime costs from sorted_dynamic.json (this CPU, 2 threads)",
            "curve": [
                {
                    "thresholds": point["thresholds"],
                    "holdout_perplexity_ratio": point["perplexity_ratio"],
                    "predicted_speedup": point["predicted_speedup"],
                    "eval_perplexity_ratio": stats["eval"].perplexity(point["thresholds"]) / full,
                }
                for point in curve
            ],
            "calibrated": {
                "thresholds": chosen["thresholds"],
                "predicted_speedup": chosen["predicted_speedup"],
                "eval_perplexity_ratio": stats["eval"].perplexity(chosen["thresholds"]) / full,
            },
        }
        print(key, json.dumps(run["dynamic"]["calibrated"]), json.dumps(run["dynamic"]["curve"][1:2]))
    QUALITY_RESULTS.write_text(json.dumps(results, indent=1))


def plot_quality(results: dict, path: Path) -> None:
    """Eval perplexity against depth: pretrained, and each run's SoFT model and SFT early exit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = results["budget"]["depths"]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    pretrained = results["perplexity"]["pretrained"]["eval"]
    axis.plot(depths, [pretrained[str(d)] for d in depths], "k:", marker=".", label="pretrained, early exit")
    for run in results["runs"]:
        name = f"lr {run['lr']:g}, {run['epochs']:g} epochs"
        soft = run["soft"]["perplexity"]["eval"]
        line = axis.plot(depths, [soft[str(d)] for d in depths], marker="o", label=f"SoFT, {name}")[0]
        sft = run["sft"]["perplexity"]["eval"]
        axis.plot(depths, [sft[str(d)] for d in depths], linestyle="--", color=line.get_color(), alpha=0.5)
        axis.scatter([depths[-1]], [sft[str(depths[-1])]], marker="*", s=90, color=line.get_color())
    axis.set_yscale("log")
    axis.set_ylim(top=1e5)
    axis.set_xlabel("sub-model depth (layers)")
    axis.set_ylabel("held-out Wikipedia perplexity")
    axis.set_title("SmolLM2-135M: SoFT (solid) vs SFT early exit (dashed; star = SFT full)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--phase", choices=("train", "measure", "quality", "quality-plot", "quality-dynamic"), required=True
    )
    parser.add_argument("--method", choices=("soft", "sft"))
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--steps", type=int, default=0, help="override the budget's steps")
    parser.add_argument(
        "--lean", action="store_true", help="measure: only the SoFT bundle's size and dynamic inference"
    )
    parser.add_argument("--device", default="cpu", help="quality: where training and scoring run (cuda)")
    parser.add_argument(
        "--runs", default="1e-4:2", help="quality: lr:epochs pairs, comma-separated (e.g. 1e-4:2,3e-4:2)"
    )
    parser.add_argument("--out", type=Path, default=QUALITY_RESULTS.parent, help="quality: output folder")
    parser.add_argument(
        "--stats", type=Path, nargs="+", default=[], help="quality-dynamic: sorted_quality_stats.npz files"
    )
    parser.add_argument("--max-minutes", type=float, default=1e9, help="quality: start no run after this")
    for name, value in QUALITY_DEFAULTS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=value, help="quality budget")
    args = parser.parse_args()
    if args.phase == "quality-plot":  # redraw from the results file (e.g. runs merged from two machines' calls)
        plot_quality(json.loads(QUALITY_RESULTS.read_text()), QUALITY_RESULTS.with_suffix(".png"))
        return
    if args.phase == "quality-dynamic":
        price_quality_runs(args.stats)
        return
    if args.phase == "quality":
        runs = [(float(lr), float(epochs)) for lr, epochs in (pair.split(":") for pair in args.runs.split(","))]
        quality(args.device, runs, args.out, args.max_minutes, **{k: getattr(args, k) for k in QUALITY_DEFAULTS})
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.phase == "train":
        _, record = trained(args.method, args.steps or None)
        print(json.dumps({k: v for k, v in record.items() if k != "history"}))
        return
    results = measure(args.steps or None, lean=args.lean)
    suffix = f"-{args.steps}" if args.steps and args.steps != BUDGET["steps"] else ""
    suffix += "_dynamic" if args.lean else ""
    RESULTS.with_name(f"sorted{suffix}.json").write_text(json.dumps(results, indent=1))
    plot(results, RESULTS.with_name(f"sorted{suffix}.png"))
    print(json.dumps({key: results[key] for key in ("perplexity", "goals", "goals_met")}, indent=1))


if __name__ == "__main__":
    main()
