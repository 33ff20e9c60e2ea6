"""SoFT vs SFT vs the pretrained model, at every depth, in torch and in the exported runtime.

    python bench/sorted.py --phase train --method soft   # or sft; both are cached
    python bench/sorted.py --phase measure               # perplexities, export, latencies -> JSON

Training runs at a reduced budget (BUDGET below, recorded in the JSON): the machine is a shared
2-core CPU. SFT is the same trainer with only the full depth: same data, steps, optimiser, seed.
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
DYNAMIC = {  # per-token exit thresholds (top-token probability) tried for dynamic inference
    "paper (0.95..0.7)": [0.95, 0.95, 0.9, 0.9, 0.8, 0.8, 0.7],
    "all 0.8": [0.8],
    "all 0.6": [0.6],
    "all 0.4": [0.4],
    "exits 18, 24 at 0.6": [2.0, 2.0, 0.6, 2.0, 0.6, 2.0, 0.0],
}
GENERATE_TOKENS = 24


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


def measure(steps: int | None) -> dict:
    import numpy as np

    from edgekit.data.wikipedia import token_stream
    from edgekit.exporters.onnx import export_onnx
    from edgekit.models import smollm2
    from edgekit.runtime.sorted import SortedModel
    from edgekit.sorted.export import exit_perplexities, export_graphs, measure_latency, segments_of, torch_exit_logits
    from edgekit.sorted.model import default_depths

    torch.set_num_threads(2)
    soft, soft_record = trained("soft", steps)
    sft, sft_record = trained("sft", steps)
    pretrained = CausalLMWithCache(load_hf()[0])
    tokenizer = load_hf()[1]
    depths = default_depths(soft.num_layers)
    tokens = token_stream(tokenizer, "eval", EVAL_TOKENS, tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    perplexity: dict[str, dict[str, float]] = {}
    dynamic_quality = {}
    for name, model in (("pretrained", pretrained), ("sft", sft), ("soft", soft)):
        print(f"perplexity at every depth: {name}", flush=True)
        per_depth, dynamic = exit_perplexities(
            torch_exit_logits(model, depths), tokens, dynamic=DYNAMIC if name == "soft" else None
        )
        perplexity[name] = {str(depth): value for depth, value in per_depth.items()}
        if name == "soft":
            dynamic_quality = dynamic
    partial = {"depths": depths, "eval_tokens": int(tokens.size), "perplexity": perplexity, "dynamic": dynamic_quality}
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
        print("timing every depth in onnxruntime", flush=True)
        latency = measure_latency(runner, 256, GENERATE_TOKENS, repeats=3)
        print("timing dynamic inference", flush=True)
        prompts = _prompts(tokenizer)
        settings = {"full depth 30": None, **DYNAMIC}
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
        dynamic_rows = []
        for name in settings:
            rate = generated[name] / seconds[name]
            row = {
                "setting": name,
                "thresholds": settings[name],
                "tokens_per_s": rate,
                "speedup_vs_full": rate / full_rate,
                "mean_exit_depth_generating": depth_sums[name] / generated[name],
            }
            if name in dynamic_quality:
                row["perplexity"] = dynamic_quality[name]["perplexity"]
                row["mean_exit_depth_eval"] = dynamic_quality[name]["mean_exit_depth"]
            else:
                row["perplexity"] = perplexity["soft"][str(depths[-1])]
            row["perplexity_vs_full"] = row["perplexity"] / perplexity["soft"][str(depths[-1])]
            dynamic_rows.append(row)
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
    sft_full = perplexity["sft"][str(depths[-1])]
    best_dynamic = [r for r in dynamic_rows[1:] if r["perplexity_vs_full"] <= 1.05]
    goals = {
        "soft_24_le_1.10x_sft_full": perplexity["soft"]["24"] / sft_full,
        "soft_15_le_1.5x_sft_full": perplexity["soft"]["15"] / sft_full,
        "sft_early_exit_15_x_sft_full": perplexity["sft"]["15"] / sft_full,
        "sft_early_exit_24_x_sft_full": perplexity["sft"]["24"] / sft_full,
        "decode_15_speedup_ge_1.8": by_depth[30]["decode_ms_per_token"] / by_depth[15]["decode_ms_per_token"],
        "dynamic_best_speedup_within_5pct_ppl_ge_1.3": max((r["speedup_vs_full"] for r in best_dynamic), default=None),
        "bundle_size_ratio_le_1.05": sorted_bytes / full_bytes,
    }
    met = {
        "soft_24_le_1.10x_sft_full": goals["soft_24_le_1.10x_sft_full"] <= 1.10,
        "soft_15_le_1.5x_sft_full": goals["soft_15_le_1.5x_sft_full"] <= 1.5,
        "decode_15_speedup_ge_1.8": goals["decode_15_speedup_ge_1.8"] >= 1.8,
        "dynamic_best_speedup_within_5pct_ppl_ge_1.3": (goals["dynamic_best_speedup_within_5pct_ppl_ge_1.3"] or 0)
        >= 1.3,
        "bundle_size_ratio_le_1.05": goals["bundle_size_ratio_le_1.05"] <= 1.05,
    }
    return {
        "budget": {
            **BUDGET,
            **({"steps": steps} if steps else {}),
            "data": "Wikipedia excerpt, non-eval articles (calib split)",
            "note": "reduced budget for a shared 2-core CPU; the recipe default is 60 steps x 4 x 128",
        },
        "training_seconds": {"soft": soft_record["seconds"], "sft": sft_record["seconds"]},
        "final_train_loss": {
            "soft": soft_record["history"][-1]["per_depth"] if soft_record["history"] else None,
            "sft": sft_record["history"][-1]["per_depth"] if sft_record["history"] else None,
        },
        "eval": {"dataset": "wikipedia eval split", "tokens": int(tokens.size), "window": 256, "stride": 128},
        "depths": depths,
        "perplexity": perplexity,
        "runtime_vs_torch_soft": agreement,
        "latency_onnxruntime_2_threads": latency,
        "dynamic": dynamic_rows,
        "bundle_bytes": {"all_depths": sorted_bytes, "one_full_depth": full_bytes},
        "onnxruntime_rss_mb": memory,
        "goals": goals,
        "goals_met": met,
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    depths = results["depths"]
    for name, label in (("pretrained", "pretrained, early exit"), ("sft", "SFT, early exit"), ("soft", "SoFT")):
        axis.plot(depths, [results["perplexity"][name][str(d)] for d in depths], marker="o", label=label)
    axis.axhline(results["perplexity"]["sft"][str(depths[-1])], color="grey", linestyle="--", label="SFT full depth")
    axis.set_yscale("log")
    axis.set_xlabel("sub-model depth (layers)")
    axis.set_ylabel("held-out Wikipedia perplexity")
    axis.set_title(f"SmolLM2-135M, {results['budget']['steps']} training steps")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", choices=("train", "measure"), required=True)
    parser.add_argument("--method", choices=("soft", "sft"))
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--steps", type=int, default=0, help="override the budget's steps")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.phase == "train":
        _, record = trained(args.method, args.steps or None)
        print(json.dumps({k: v for k, v in record.items() if k != "history"}))
        return
    results = measure(args.steps or None)
    suffix = f"-{args.steps}" if args.steps and args.steps != BUDGET["steps"] else ""
    RESULTS.with_name(f"sorted{suffix}.json").write_text(json.dumps(results, indent=1))
    plot(results, RESULTS.with_name(f"sorted{suffix}.png"))
    print(json.dumps({key: results[key] for key in ("perplexity", "goals", "goals_met")}, indent=1))


if __name__ == "__main__":
    main()
