"""MobileQuant on SmolLM2-135M: the choices made on held-out calibration-split tokens.

Every figure is the simulated (fake-quant) model's perplexity on the 2,048 Wikipedia
calibration-split tokens after the training windows (256-token windows), never on the evaluation
split the main bench reports. Two parts:

- ``where``: where W4A8 loses, with nothing learned (SmoothQuant α=0.5 + MinMax, clipping logits
  at the paper's b₀ = 4): fp32, then weights only, activations only, and both, each with the LM head
  (and the lookup table it shares) at 8 bits per row, as the recipe has it, and at 4.
- ``rates``: the recipe learned at ``--samples`` × ``--epochs`` (windows of ``--seq-len`` tokens,
  ``--batch-size`` per step) with each weight-clipping rate of ``--rates`` (``bits:rate`` pairs), the
  rest at the recipe's defaults.

Results: ``bench/results/mobilequant_heldout.json``, one entry per budget (``32x2``; ``64x3@256``
for 256-token windows); a run replaces its budget's entry and keeps the others. Usage:
python bench/mobilequant_heldout.py [--samples 32 --epochs 2 --rates 4:1e-2,8:1e-2 --skip-where]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _shared import rerun_command, simulated_perplexity

from edgekit.calibrate import calibration_inputs

RESULTS = Path(__file__).parent / "results" / "mobilequant_heldout.json"
STREAM = 60_000  # calibration-split tokens read; the last HELDOUT are scored, the windows come first
HELDOUT = 2_048
SEQ_LEN = 128  # the recipe's calibration window


def where_w4a8_loses(bundle, calib, tokens, seq_len: int) -> dict[str, float]:
    from edgekit.quantize.fakequant import WeightQuant
    from edgekit.quantize.mobilequant import Config, quantize_model

    config = Config(weight_bits=4, samples=len(calib), seq_len=seq_len, epochs=0)
    model, _ = quantize_model(bundle.module, calib, config, show_progress=False)
    wide_head = model.head_wquant
    narrow_head = WeightQuant(wide_head.logit.numel(), 4, True, learn=False)
    rows: dict[str, float] = {}
    for name, weights, acts, head in (
        ("fp32 (nothing quantized)", False, False, wide_head),
        ("activations only (8/16-bit)", False, True, wide_head),
        ("W4 weights only, head 8-bit", True, False, wide_head),
        ("W4 weights only, head 4-bit", True, False, narrow_head),
        ("W4A8, head 8-bit", True, True, wide_head),
        ("W4A8, head 4-bit", True, True, narrow_head),
    ):
        model.head_wquant = head
        model.set_quant(weights=weights, acts=acts).eval()
        rows[name] = simulated_perplexity(model, tokens)
        print(f"{name}: {rows[name]:.2f}", file=sys.stderr)
    return rows


def clipping_rates(bundle, calib, tokens, pairs: list[tuple[int, float]], args: argparse.Namespace) -> list[dict]:
    from edgekit.quantize.mobilequant import Config, quantize_model

    rows = []
    for bits, rate in pairs:
        config = Config(
            weight_bits=bits,
            samples=len(calib),
            seq_len=args.seq_len,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr_clip=rate,
        )
        model, facts = quantize_model(bundle.module, calib, config)
        model.set_quant(weights=True, acts=True).eval()
        row = {
            "weight_bits": bits,
            "lr_clip": rate,
            "perplexity": simulated_perplexity(model, tokens),
            **{key: facts[key] for key in ("steps", "mse_init", "mse_final", "seconds")},
        }
        print(json.dumps(row), file=sys.stderr)
        rows.append(row)
    return rows


def main() -> None:
    from edgekit.data.wikipedia import token_stream
    from edgekit.models import load as load_model

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=32, help="calibration windows")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN, help="tokens per calibration window")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per optimiser step")
    parser.add_argument("--rates", default="4:1e-3,4:1e-2,4:5e-2,8:1e-2,8:5e-2", help="bits:lr_clip pairs")
    parser.add_argument("--skip-where", action="store_true", help="clipping rates only")
    args = parser.parse_args()
    pairs = [(int(bits), float(rate)) for bits, rate in (pair.split(":") for pair in args.rates.split(",") if pair)]
    most = (STREAM - HELDOUT) // args.seq_len
    if not 0 < args.samples <= most:
        raise SystemExit(f"--samples must be 1..{most} (more windows reach the held-out tokens)")

    started = time.perf_counter()
    bundle = load_model("zoo:smollm2-135m")
    tokens = token_stream(bundle.tokenizer, "calib", max_tokens=STREAM)[-HELDOUT:]
    calib = calibration_inputs(bundle, None, args.samples, args.seq_len)
    result = {
        "command": rerun_command(),
        "samples": args.samples,
        "epochs": args.epochs,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "where_w4a8_loses": {} if args.skip_where else where_w4a8_loses(bundle, calib, tokens, args.seq_len),
        "clipping_rates": clipping_rates(bundle, calib, tokens, pairs, args),
        "seconds": time.perf_counter() - started,
    }
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    budget = f"{args.samples}x{args.epochs}" + ("" if args.seq_len == SEQ_LEN else f"@{args.seq_len}")
    budgets = previous.get("budgets", {}) | {budget: result}
    merged = {"model": "smollm2-135m", "heldout_tokens": HELDOUT, "budgets": budgets}
    RESULTS.write_text(json.dumps(merged, indent=2) + "\n")
    print("| part | setting | held-out ppl |")
    for name, value in result["where_w4a8_loses"].items():
        print(f"| where | {name} | {value:.2f} |")
    for row in result["clipping_rates"]:
        print(f"| rates | W{row['weight_bits']}A8 lr_clip {row['lr_clip']:g} | {row['perplexity']:.2f} |")


if __name__ == "__main__":
    main()
