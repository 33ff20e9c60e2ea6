"""MobileQuant W8A8 on the encoders: MiniLM-L6 (sentence embeddings) and DINOv2-S/14 (CLS token).

Rows per model: fp32, ptq-int8 (onnxruntime MinMax, matmul inputs only), SmoothQuant α=0.5 + MinMax
at MobileQuant's bits, MobileQuant W8A8. Each is exported to ONNX by the pipeline and run in
onnxruntime. Quality is the cosine of the exported file's output to the float model's: MiniLM's
sentence embedding on the Lee evaluation sentences (60), DINOv2's CLS token on the evaluation photos
(7) and, because seven is few, on held-out photos of the calibration split (those past the first
``--heldout-from``; calibration reads the first ``samples``). Per row also: file size and prefill
latency against fp32 (interleaved in this process), runtime-vs-simulated SQNR, the Snapdragon 8 Gen
3 NPU profile's integer coverage, and the transform (calibration) time.

The ``*.pte`` rows lower fp32 and the int8-only MobileQuant model (the 8-bit model XNNPACK can run,
learned ranges fixed) to ExecuTorch, scored the same way in its runtime; their size and latency
ratios are to the fp32 .pte.

Usage: python bench/mobilequant_encoders.py [--models minilm-l6,dinov2-s14] [--rows ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _shared import finite_or_none, rerun_command

RESULTS = Path(__file__).parent / "results" / "mobilequant_encoders.json"
MODELS = {"minilm-l6": 60, "dinov2-s14": 7}  # model -> evaluation samples (the whole eval split)
ROWS = {  # row -> (recipe, bits W/A, extra recipe settings)
    "fp32": ("fp32", "32/32", []),
    "ptq-int8": ("ptq-int8", "8/8 (matmul inputs; the rest float)", []),
    "smoothquant+minmax": ("smoothquant-w8a8", "8/8+16", []),
    "mobilequant-w8a8": ("mobilequant-w8a8", "8/8+16", []),
    # ExecuTorch XNNPACK: the 8-bit model it can run (no 16-bit activations), against its own fp32
    "fp32.pte": ("fp32", "32/32", []),
    # the gate off: this row's SQNRs are recorded (MiniLM's file sat at 9.8 dB from its simulation,
    # under the recipe's 10 dB floor) rather than the run stopping before its latency is measured
    "mobilequant-w8a8-int8only.pte": ("mobilequant-w8a8-int8only", "8/8", ["verify.min_sqnr_db=0"]),
}
DEVICE = "snapdragon-8gen3-npu"


def row_format(row: str) -> str:
    """A row named ``*.pte`` is exported to ExecuTorch, the others to ONNX."""
    return "pte" if row.endswith(".pte") else "onnx"


def heldout_cosine(name: str, directory: Path, fmt: str, start: int, count: int) -> dict | None:
    """DINOv2's CLS cosine to float on calibration-split photos past the calibration ones."""
    import torch

    from edgekit import data as datasets
    from edgekit import runtime
    from edgekit.evaluate import cosine
    from edgekit.models import load as load_model

    if name != "dinov2-s14":
        return None
    bundle = load_model(f"zoo:{name}")
    items = datasets.items("photos", "calib", None)[start : start + count]
    session = runtime.load(directory, fmt)
    graph = session.graph("main")
    reference, candidate = [], []
    for item in items:
        feeds = bundle.preprocess(item.raw)
        with torch.no_grad():
            reference.append(bundle.module(**feeds)[:, 0].numpy())
        output = session.run({graph.inputs[0].name: feeds["pixel_values"].numpy()})
        candidate.append(next(iter(output.values()))[:, 0])
    return {"samples": len(items), "cosine": cosine(np.concatenate(reference), np.concatenate(candidate))}


def integer_coverage(directory: Path) -> dict:
    from edgekit.devices.check import check
    from edgekit.exporters.onnx_ops import onnx_op_stats

    size = sum(p.stat().st_size for p in directory.iterdir() if p.is_file() and p.suffix in (".onnx", ".data"))
    verdict = check(onnx_op_stats(directory / "model.onnx"), size, None, DEVICE, "onnx-qdq")
    return {
        "integer_coverage_count": verdict.integer_coverage_count,
        "integer_coverage_flops": verdict.integer_coverage_flops,
        "device_check_passed": verdict.passed,
    }


def bench_model(name: str, work: Path, rows: list[str], args, table: dict = ROWS, eval_samples: dict = MODELS) -> dict:
    """Each row exported by the pipeline: quality, size, coverage, SQNR; latency against fp32."""
    from edgekit import pipeline, recipes

    result: dict = {"model": name, "rows": {}}
    directories: dict[str, Path] = {}
    for row in rows:
        recipe, bits, settings = table[row]
        fmt = row_format(row)
        out = work / f"{name}-{row}"
        budget = [f"samples={args.samples}"] if args.samples and recipe != "fp32" else []
        if args.epochs and hasattr(recipes.load(recipe).settings, "epochs"):
            budget.append(f"epochs={args.epochs}")
        overrides = [*settings, *budget] if recipe != "fp32" else []
        print(f"== {name} {row}", file=sys.stderr)
        started = time.perf_counter()
        plan = pipeline.plan_export(
            f"zoo:{name}",
            recipe,
            "x86-cpu-onnxruntime",
            out,
            fmt,
            baseline=False,
            eval_samples=eval_samples[name],
            overrides=overrides,
        )
        report = pipeline.run_export(plan).report
        entry = report["formats"][fmt]
        check = entry["verification"]
        facts = {
            "bits_w_a": bits,
            "seconds": time.perf_counter() - started,
            "bytes": entry["bytes"],
            "quality": entry["quality"],
            "sqnr_vs_float_db": check["runtime_vs_float"]["sqnr_db"],
            "sqnr_vs_simulated_db": check["runtime_vs_simulated"]["sqnr_db"],
            "simulated_sqnr_vs_float_db": finite_or_none(check["simulated_vs_float"]["sqnr_db"]),
            **(integer_coverage(out) if fmt == "onnx" else {}),
        }
        if "mobilequant" in report:
            facts["mobilequant"] = report["mobilequant"]
        heldout = heldout_cosine(name, out, fmt, args.heldout_from, args.heldout)
        if heldout:
            facts["heldout_photos"] = heldout
        result["rows"][row] = facts
        directories[row] = out
    result["latency_ms"] = {}
    for fmt, fp32 in (("onnx", "fp32"), ("pte", "fp32.pte")):  # each format against its own fp32
        group = {row: out for row, out in directories.items() if row_format(row) == fmt}
        if fp32 not in group:
            continue
        result["latency_ms"] |= row_latency(name, group, fmt, args.latency_rounds)
        for row in group:
            facts = result["rows"][row]
            facts["size_ratio"] = facts["bytes"] / result["rows"][fp32]["bytes"]
            facts["latency_ratio"] = result["latency_ms"][row] / result["latency_ms"][fp32]
    return result


def run_models(results: Path, args, table: dict = ROWS, eval_samples: dict = MODELS) -> dict:
    """``bench_model`` for each of ``args.models``, merged into ``results`` (rewritten after each).

    Rows re-run replace their old entries; the model's other rows are kept as they were measured
    (each row records the command that measured it, and its ratios are to that run's fp32)."""
    previous = json.loads(results.read_text()) if results.is_file() else {"models": {}}
    command = rerun_command()
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-") as tmp:
        for name in args.models.split(","):
            fresh = bench_model(name, Path(tmp), args.rows.split(","), args, table, eval_samples)
            old = previous["models"].get(name, {})
            measured = {row: {**facts, "command": command} for row, facts in fresh["rows"].items()}
            rows = {**old.get("rows", {}), **measured}
            latency = {**old.get("latency_ms", {}), **fresh.get("latency_ms", {})}
            fresh["rows"] = {row: rows[row] for row in table if row in rows}
            fresh["latency_ms"] = {row: latency[row] for row in table if row in latency}
            previous["models"][name] = fresh
            previous["command"] = command
            results.parent.mkdir(parents=True, exist_ok=True)
            results.write_text(json.dumps(previous, indent=2))
    return previous


def row_latency(name: str, directories: dict[str, Path], fmt: str, rounds: int) -> dict[str, float]:
    """Each row's latency on one evaluation input, rows alternated (export_baseline's helper)."""
    from export_baseline import interleaved_latency

    from edgekit.calibrate import calibration_inputs
    from edgekit.models import load as load_model

    feeds = calibration_inputs(load_model(f"zoo:{name}"), None, 1, seq_len=128, split="eval")[0]
    return interleaved_latency(directories, fmt, feeds, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--samples", type=int, default=None, help="calibration samples (default: each recipe's)")
    parser.add_argument("--epochs", type=int, default=None, help="learning epochs (default: each recipe's)")
    parser.add_argument("--heldout-from", type=int, default=100)
    parser.add_argument("--heldout", type=int, default=60)
    parser.add_argument("--latency-rounds", type=int, default=5)
    args = parser.parse_args()
    previous = run_models(RESULTS, args)
    for name, result in previous["models"].items():
        print(f"\n{name}")
        print("| method | bits W/A | cosine to fp32 | held-out | size × | latency × | int coverage | SQNR vs sim | s |")
        for row, f in result["rows"].items():
            held = f.get("heldout_photos", {}).get("cosine")
            print(
                f"| {row} | {f['bits_w_a']} | {f['quality']['export']:.4f} | "
                f"{'-' if held is None else f'{held:.4f}'} | {f.get('size_ratio', float('nan')):.3f} | "
                f"{f.get('latency_ratio', float('nan')):.2f} | {f.get('integer_coverage_count', float('nan')):.3f} | "
                f"{f['sqnr_vs_simulated_db']:.1f} | {f['seconds']:.0f} |"
            )


if __name__ == "__main__":
    main()
