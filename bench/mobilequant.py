"""MobileQuant on SmolLM2-135M: perplexity of each exported ONNX file, run in onnxruntime.

Rows: fp32, ptq-int8 (onnxruntime MinMax W8A8), SmoothQuant α=0.5 + MinMax (same bits as
MobileQuant W8A8), MobileQuant W8A8, W8A8 int8-only, SmoothQuant + MinMax at W4A8 (per-channel
round-to-nearest int4, nothing learned: W4A8's baseline), MobileQuant W4A8. Per row: bits, perplexity on the
Wikipedia evaluation split (the .onnx prefill graph in onnxruntime, 256-token windows), ratio to
fp32, file size, prefill latency ratio to fp32 (256 tokens, interleaved in this process),
calibration (transform) time, and the Snapdragon 8 Gen 3 NPU profile's integer coverage. Rows that
learn in torch also report the perplexity of their simulated (fake-quant) model on the same tokens,
so a gap between the simulation and the exported file shows up in the table.

``--pte-rows`` (default fp32 and the int8-only MobileQuant, the 8-bit model XNNPACK can run) are
also lowered to ExecuTorch .pte (XNNPACK, static 256-token prefill, learned ranges fixed): their
perplexity run in the ExecuTorch runtime and their prefill latency against the fp32 .pte, same run:
the two programs alternated in a fresh interpreter (``prefill_ms_256``, ``speedup_vs_fp32``), and
again in this process (``*_in_bench_process``).
The ONNX files are prefill graphs only (``export_onnx(decode=False)``): the bench measures prompts.

Budget flags override the recipes' defaults (``--samples``, ``--seq-len``, ``--epochs``; also
``--lr-clip``, the clipping rate; ``--calib-skip N`` calibrates on the windows after the first N) and
``--layers`` benchmarks the first N decoder layers only (then final norm + head), for machines
where the full model does not fit the time. Usage: python bench/mobilequant.py [--layers 4 ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

import numpy as np
from _shared import alternated_seconds, fresh_process_pte_seconds, simulated_perplexity

from edgekit import recipes
from edgekit.calibrate import calibration_inputs
from edgekit.evaluate import perplexity

RESULTS = Path(__file__).parent / "results" / "mobilequant.json"
ROWS = {  # row -> (recipe, bits W/A, extra recipe settings)
    "fp32": ("fp32", "32/32", {}),
    "ptq-int8": ("ptq-int8", "8/8", {}),
    "smoothquant+minmax": ("smoothquant-w8a8", "8/8+16", {}),
    "mobilequant-w8a8": ("mobilequant-w8a8", "8/8+16", {}),
    "mobilequant-w8a8-int8only": ("mobilequant-w8a8-int8only", "8/8", {}),
    "smoothquant+minmax-w4a8": ("smoothquant-w8a8", "4/8+16", {"weight_bits": "4"}),
    "mobilequant-w4a8": ("mobilequant-w4a8", "4/8+16", {}),
}
DEVICE = "snapdragon-8gen3-npu"
PREFILL = 256  # prefill latency length and the .pte's static window
T = TypeVar("T")


def load_bundle(layers: int | None):
    from edgekit.models import load as load_model
    from edgekit.models.llama import CausalLMWithCache
    from edgekit.models.smollm2 import load_hf

    bundle = load_model("zoo:smollm2-135m")
    if layers:
        hf, _, _ = load_hf()
        bundle = bundle.replace(module=CausalLMWithCache(hf, num_layers=layers).eval())
    return bundle


def onnx_facts(directory: Path, result) -> dict:
    from edgekit.devices.check import check
    from edgekit.exporters.onnx_ops import onnx_op_stats

    size = sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
    prefill = result.graphs["prefill"].path
    quantized = result.precision == "qdq"
    verdict = check(onnx_op_stats(prefill), size, None, DEVICE, "onnx-qdq" if quantized else "onnx")
    return {
        "bytes": size,
        "integer_coverage_count": verdict.integer_coverage_count,
        "integer_coverage_flops": verdict.integer_coverage_flops,
        "device_check_passed": verdict.passed,
        "float_islands": verdict.dequantized,
        "rejected": verdict.rejected,
    }


def main() -> None:
    from edgekit.data.wikipedia import token_stream
    from edgekit.exporters.onnx import export_onnx
    from edgekit.exporters.verify import onnx_session

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=None, help="first N decoder layers only")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr-clip", type=float, default=None, help="MobileQuant clipping rate")
    parser.add_argument(
        "--calib-skip", type=int, default=0, help="calibrate on the windows after the first N (another draw of data)"
    )
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--latency-rounds", type=int, default=3)
    parser.add_argument("--merge", action="store_true", help="keep the result file's rows of methods not re-run")
    parser.add_argument("--pte-rows", default="fp32,mobilequant-w8a8-int8only", help="rows also lowered to .pte")
    args = parser.parse_args()

    bundle = load_bundle(args.layers)
    tokens = token_stream(bundle.tokenizer, "eval", max_tokens=args.eval_tokens)
    tokens = tokens[: max(PREFILL, len(tokens) // PREFILL * PREFILL)]  # whole windows: the .pte is static
    pte_rows = [name for name in args.pte_rows.split(",") if name]
    programs: dict[str, object] = {}
    settings = {
        "samples": args.samples,
        "seq_len": args.seq_len,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr_clip": args.lr_clip,
    }
    rows: list[dict] = []
    kept = _kept_rows(args) if args.merge else []
    earlier_pte = _earlier_pte_rows() if args.merge else {}
    sessions = {}
    with tempfile.TemporaryDirectory(prefix="edgekit-mq-bench-") as tmp:
        for row_name in args.rows.split(","):
            recipe_name, bits, extra = ROWS[row_name]
            print(f"== {row_name}", file=sys.stderr)
            overrides = {
                key: str(value)
                for key, value in settings.items()
                if value is not None and hasattr(recipes.load(recipe_name).settings, key)
            } | extra
            recipe = recipes.load(recipe_name, overrides).for_model(bundle.module)
            samples = int(getattr(recipe.settings, "samples", 0) or 0)
            seq_len = int(getattr(recipe.settings, "seq_len", args.seq_len or 128))
            calib = calibration_inputs(bundle, None, args.calib_skip + samples, seq_len) if samples else []
            calib = calib[args.calib_skip :]
            started = time.perf_counter()
            if recipe.transform == "ptq":  # the ONNX row needs only the plan: onnxruntime calibrates
                from edgekit.quantize.ptq import spec_from_config

                transformed = bundle.replace(quant=spec_from_config(recipe.settings))
            else:
                transformed = recipe.transform_module().apply(bundle, calib, recipe.settings)
            calibration_seconds = time.perf_counter() - started
            out = Path(tmp) / row_name
            started = time.perf_counter()
            result = export_onnx(transformed, out, calib or None, decode=False)
            export_seconds = time.perf_counter() - started
            session = onnx_session(result.graphs["prefill"].path)
            sessions[row_name] = session
            ppl = perplexity(lambda ids, s=session: s.run(None, {"input_ids": ids})[0], tokens, 256, 256)
            row = {
                "method": row_name,
                "recipe": recipe_name,
                "bits_w_a": bits,
                "settings": recipe.as_dict()["settings"],
                "perplexity": ppl,
                "calibration_seconds": calibration_seconds if samples else 0.0,
                "export_seconds": export_seconds,
                **onnx_facts(out, result),
            }
            if transformed.simulated is not None and row_name != "ptq-int8":
                row["simulated_perplexity"] = simulated_perplexity(transformed.simulated, tokens)
            if "mobilequant" in transformed.meta:
                row["mobilequant"] = {
                    k: v for k, v in transformed.meta["mobilequant"].items() if isinstance(v, int | float | dict)
                }
            # prefill latency at 256 tokens, interleaved with fp32 so both see the same machine load
            ids = tokens[None, :PREFILL].astype(np.int64)
            runs = {name: (lambda s=s, ids=ids: s.run(None, {"input_ids": ids})) for name, s in sessions.items()}
            latency = alternated_seconds(_with_fp32(runs, row_name), args.latency_rounds)
            row["prefill_ms_256"] = 1000 * latency[row_name]
            if "fp32" in latency:
                row["fp32_prefill_ms_256_same_run"] = 1000 * latency["fp32"]
                row["prefill_latency_ratio"] = latency[row_name] / latency["fp32"]
            if row_name in pte_rows:
                row["pte"] = _pte_row(transformed, Path(tmp) / f"{row_name}-pte", tokens, programs, row_name, args)
            elif row_name in earlier_pte:  # not lowered this run: keep the .pte measurement it had
                row["pte"] = earlier_pte[row_name]
            if rows and rows[0]["method"] == "fp32":
                row["perplexity_ratio"] = row["perplexity"] / rows[0]["perplexity"]
                row["size_ratio"] = row["bytes"] / rows[0]["bytes"]
            if row_name != "fp32":
                sessions.pop(row_name)  # keep memory bounded: only fp32 stays loaded
                programs.pop(row_name, None)
            rows.append(row)
            print(
                json.dumps({k: row[k] for k in ("method", "perplexity", "bytes", "calibration_seconds")}),
                file=sys.stderr,
            )
            _write(args, kept, rows)
    rows = _write(args, kept, rows)
    header = ("method", "W/A bits", "ppl", "× fp32", "sim ppl", "MB", "size ×", "prefill ×", "calib s", "int cov")
    print(" | ".join(header))
    for row in rows:
        cov = row.get("integer_coverage_count")
        print(
            " | ".join(
                [
                    row["method"],
                    row["bits_w_a"],
                    f"{row['perplexity']:.2f}",
                    f"{row.get('perplexity_ratio', float('nan')):.3f}",
                    f"{row['simulated_perplexity']:.2f}" if "simulated_perplexity" in row else "-",
                    f"{row['bytes'] / 1e6:.1f}",
                    f"{row.get('size_ratio', float('nan')):.3f}",
                    f"{row.get('prefill_latency_ratio', float('nan')):.2f}",
                    f"{row['calibration_seconds']:.0f}",
                    "-" if cov is None else f"{100 * cov:.1f}%",
                ]
            )
        )
    print(f"wrote {RESULTS}")


def _with_fp32(items: Mapping[str, T], row_name: str) -> dict[str, T]:
    """fp32's entry (when there is one) and ``row_name``'s: what a latency ratio compares."""
    return {name: items[name] for name in dict.fromkeys(("fp32", row_name)) if name in items}


def _pte_row(transformed, out: Path, tokens: np.ndarray, programs: dict, row_name: str, args) -> dict:
    """Lower the row to a static 256-token .pte; perplexity in the ExecuTorch runtime, latency vs fp32."""
    import torch

    from edgekit.exporters.executorch import export_pte
    from edgekit.runtime.pte import PteProgram

    ids = tokens[None, :PREFILL].astype(np.int64)
    static = transformed.replace(example_inputs={"input_ids": torch.as_tensor(ids)})
    started = time.perf_counter()
    result = export_pte(static, out)
    export_seconds = time.perf_counter() - started
    program = PteProgram(result.path, ["input_ids"])
    programs[row_name] = program
    ppl = perplexity(lambda window: program.run({"input_ids": window})[0], tokens, PREFILL, PREFILL)
    runs = {name: (lambda p=p: p.run({"input_ids": ids})) for name, p in programs.items()}
    in_bench = alternated_seconds(_with_fp32(runs, row_name), args.latency_rounds)
    paths = {name: program.path for name, program in _with_fp32(programs, row_name).items()}
    fresh = fresh_process_pte_seconds(paths, {"input_ids": ids}, max(args.latency_rounds, 5))
    facts = {
        "perplexity": ppl,
        "bytes": result.size_bytes,
        "export_seconds": export_seconds,
        "delegated_ops": result.delegation.delegated_ops,
        "undelegated_ops": result.delegation.undelegated_ops,
        "prefill_ms_256": 1000 * fresh[row_name],
        "prefill_ms_256_in_bench_process": 1000 * in_bench[row_name],
    }
    if "fp32" in fresh:
        facts["fp32_prefill_ms_256_same_run"] = 1000 * fresh["fp32"]
        facts["speedup_vs_fp32"] = fresh["fp32"] / fresh[row_name]
        facts["speedup_vs_fp32_in_bench_process"] = in_bench["fp32"] / in_bench[row_name]
    print(json.dumps({"pte": row_name, **facts}), file=sys.stderr)
    return facts


def _kept_rows(args) -> list[dict]:
    """Rows of an earlier run for methods this run does not measure (each with its own budget)."""
    if not RESULTS.exists():
        return []
    earlier = json.loads(RESULTS.read_text())
    rerun = set(args.rows.split(","))
    return [{"budget": earlier.get("budget"), **row} for row in earlier["rows"] if row["method"] not in rerun]


def _earlier_pte_rows() -> dict[str, dict]:
    """Method -> the .pte measurement an earlier run recorded for it, with that run's budget."""
    if not RESULTS.exists():
        return {}
    earlier = json.loads(RESULTS.read_text())["rows"]
    # one already carried forward keeps the budget of the run that measured it (it comes second)
    return {row["method"]: {"budget": row.get("budget"), **row["pte"]} for row in earlier if "pte" in row}


def _write(args, kept: list[dict], rows: list[dict]) -> list[dict]:
    """Write every row in ROWS order; rows measured in this run carry this run's budget."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    budget = {k: v for k, v in vars(args).items()}
    merged = sorted(kept + [{"budget": budget, **row} for row in rows], key=lambda row: list(ROWS).index(row["method"]))
    RESULTS.write_text(json.dumps({"model": "smollm2-135m", "rows": merged}, indent=2))
    return merged


if __name__ == "__main__":
    main()
