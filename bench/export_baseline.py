"""fp32 vs ptq-int8 for the zoo: quality on real data, runtime latency ratio, file size ratio.

Every recipe x format is exported on its own in this process (a failing format is recorded with its
error, the other is still measured); latencies are then measured interleaved in the same process
(onnxruntime for .onnx, the ExecuTorch runtime for .pte), so the ratios compare like with like on
whatever machine runs this. Usage: python bench/export_baseline.py [--models a,b]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _shared import finite_or_none

from edgekit import pipeline, runtime
from edgekit.calibrate import calibration_inputs
from edgekit.models import load as load_model

MODELS = ["fmnist-cnn", "mobilenetv2", "minilm-l6", "smollm2-135m"]
RESULTS = Path(__file__).parent / "results" / "export_baseline.json"


def interleaved_latency(bundles: dict[str, Path], fmt: str, feeds: dict[str, np.ndarray], rounds: int = 5) -> dict:
    sessions = {name: runtime.load(path, fmt) for name, path in bundles.items()}
    medians: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            graph = session.graph("prefill" if "prefill" in session.graphs else "main")
            medians[name].append(session.latency_ms(pipeline._fit_to_graph(feeds, graph), repeats=5, warmup=1))
    return {name: float(np.median(values)) for name, values in medians.items()}


def bench_model(name: str, work: Path, eval_samples: int, recipes: list[str]) -> dict:
    """Each recipe x format exported on its own, so one format's failure hides nothing of the other.

    Recipes not in ``recipes`` keep their last measurement; latency ratios need both in one run.
    """
    previous = json.loads(RESULTS.read_text())["rows"] if RESULTS.is_file() else []
    row: dict = next((dict(other) for other in previous if other["model"] == name), {"model": name})
    if len(recipes) < 2:
        row = {key: value for key, value in row.items() if "latency" not in key}
    bundles: dict[tuple[str, str], Path] = {}
    for recipe in recipes:
        row[recipe] = {}
        for fmt in ("onnx", "pte"):
            out = work / f"{name}-{recipe}-{fmt}"
            started = time.perf_counter()
            plan = pipeline.plan_export(
                f"zoo:{name}", recipe, "x86-cpu-onnxruntime", out, fmt, baseline=False, eval_samples=eval_samples
            )
            try:
                result = pipeline.run_export(plan)
            except Exception as error:  # noqa: BLE001  (any failure of one format is recorded, the run goes on)
                row[recipe][fmt] = {"error": f"{type(error).__name__}: {error}"}
                continue
            bundles[(recipe, fmt)] = out
            entry = result.report["formats"][fmt]
            check = entry["verification"]["runtime_vs_simulated"]
            row[recipe][fmt] = {
                "export_seconds": time.perf_counter() - started,
                "bytes": entry["bytes"],
                "quality": entry["quality"],
                "sqnr_vs_float_db": entry["verification"]["runtime_vs_float"]["sqnr_db"],
                "simulated_sqnr_vs_float_db": finite_or_none(entry["verification"]["simulated_vs_float"]["sqnr_db"]),
                "sqnr_vs_simulated_db": check["sqnr_db"],
                "top1_agreement_vs_simulated": check.get("top1_agreement"),
            }
            write_row(row)
    bundle = load_model(f"zoo:{name}")
    feeds = calibration_inputs(bundle, None, 1, seq_len=128, split="eval")[0]
    for fmt in ("onnx", "pte"):
        if ("fp32", fmt) in bundles and ("ptq-int8", fmt) in bundles:
            pair = {recipe: bundles[(recipe, fmt)] for recipe in ("fp32", "ptq-int8")}
            latency = interleaved_latency(pair, fmt, feeds)
            row[f"{fmt}_latency_ms"] = latency
            row[f"{fmt}_latency_ratio_int8_fp32"] = latency["ptq-int8"] / latency["fp32"]
        sizes = [row.get(recipe, {}).get(fmt, {}).get("bytes") for recipe in ("ptq-int8", "fp32")]
        if all(sizes):
            row[f"{fmt}_size_ratio_int8_fp32"] = sizes[0] / sizes[1]
    return row


def write_row(row: dict) -> None:
    """Replace this model's row in the results file, re-read first (other runs may have written)."""
    rows = json.loads(RESULTS.read_text())["rows"] if RESULTS.is_file() else []
    rows = [other for other in rows if other["model"] != row["model"]] + [row]
    rows.sort(key=lambda other: MODELS.index(other["model"]) if other["model"] in MODELS else len(MODELS))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"rows": rows}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--eval-samples", type=int, default=64)
    parser.add_argument("--recipes", default="fp32,ptq-int8", help="re-measure only these (others kept)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-") as tmp:
        for name in args.models.split(","):
            print(f"== {name}", file=sys.stderr)
            write_row(bench_model(name, Path(tmp), args.eval_samples, args.recipes.split(",")))
    rows = json.loads(RESULTS.read_text())["rows"]  # other models' rows are their last measurement
    header = ("model", "metric", "fp32", "int8 onnx", "int8 pte", "ort lat ×", "et lat ×", "onnx size ×", "pte size ×")
    print(" | ".join(header))
    for row in rows:
        fp32, int8 = row.get("fp32", {}), row.get("ptq-int8", {})
        quality = (fp32.get("onnx") or {}).get("quality", {})

        def q(entry: dict, fmt: str) -> str:
            value = (entry.get(fmt) or {}).get("quality", {}).get("export")
            return "-" if value is None else f"{value:.4g}"

        def r(key: str, row: dict = row) -> str:
            value = row.get(key)
            return "-" if value is None else f"{value:.3f}"

        print(
            " | ".join(
                [
                    row["model"],
                    quality.get("metric", "-"),
                    q(fp32, "onnx"),
                    q(int8, "onnx"),
                    q(int8, "pte"),
                    r("onnx_latency_ratio_int8_fp32"),
                    r("pte_latency_ratio_int8_fp32"),
                    r("onnx_size_ratio_int8_fp32"),
                    r("pte_size_ratio_int8_fp32"),
                ]
            )
        )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
