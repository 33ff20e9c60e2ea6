"""Where W8A8 loses perplexity on SmolLM2-135M: per-site ablations of the simulated model.

SmoothQuant α=0.5 + MinMax ranges at MobileQuant's bit-widths (the starting point MobileQuant
learns from), or with ``--learned`` the MobileQuant W8A8 model as the recipe trains it (the family's
default budget unless ``--samples``/``--epochs`` say otherwise), simulated in torch; perplexity on
the Wikipedia evaluation split (256-token windows). Rows: float, weights only, activations only,
everything, then everything but one group of activation quantizers left in float. Results in
``bench/results/mobilequant_ablations.json``, one entry per starting point.
Usage: python bench/mobilequant_ablate.py [--learned] [--layers N] [--samples 8] [--eval-tokens 2048]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _shared import rerun_command, simulated_perplexity

RESULTS = Path(__file__).parent / "results" / "mobilequant_ablations.json"
# group -> activation sites (edgekit.quantize.llama.LAYER_SITES / HEAD_SITES) left in float
GROUPS = {
    "qkv input": ["attn_in"],
    "gate/up input": ["mlp_in"],
    "o_proj input": ["attn_out"],
    "down_proj input": ["prod"],
    "attention matmul inputs (q, k, v, probs)": ["q_rope", "k_rope", "v", "probs"],
    "q/k projection outputs": ["q", "k"],
    "softmax input": ["scores", "masked"],
    "softmax output": ["probs"],
    "o_proj output": ["o"],
    "down_proj output": ["down"],
    "residual adds": ["res_attn", "res_mlp"],
    "SiLU/gate/up (non-linear)": ["gate", "act", "up"],
    "final norm output (lm_head input)": ["final"],
    "logits": ["logits"],
}


def main() -> None:
    from edgekit.calibrate import calibration_inputs
    from edgekit.data.wikipedia import token_stream
    from edgekit.models import smollm2
    from edgekit.models.llama import CausalLMWithCache
    from edgekit.quantize import mobilequant

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--learned", action="store_true", help="ablate the learned MobileQuant W8A8 model")
    parser.add_argument("--samples", type=int, default=None, help="default: 8, or the family's when --learned")
    parser.add_argument("--epochs", type=int, default=None, help="with --learned; default: the family's")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-tokens", type=int, default=2048)
    args = parser.parse_args()

    bundle = smollm2.load()
    module = bundle.module
    if args.layers:
        module = CausalLMWithCache(module.hf_model, num_layers=args.layers).eval()
    if args.learned:
        config = mobilequant.Config(samples=args.samples, seq_len=args.seq_len, epochs=args.epochs)
    else:
        config = mobilequant.Config(samples=args.samples or 8, seq_len=args.seq_len, learn=False, epochs=0)
    config = mobilequant.settings_for(config, module)
    calib = calibration_inputs(bundle, None, config.samples, args.seq_len)
    tokens = token_stream(bundle.tokenizer, "eval", max_tokens=args.eval_tokens)
    model, facts = mobilequant.quantize_model(module, calib, config, show_progress=args.learned)
    model.eval()
    start = "mobilequant-w8a8" if args.learned else "smoothquant+minmax"
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    entry = {
        "command": rerun_command(),
        "samples": config.samples,
        "epochs": config.epochs,
        "seq_len": args.seq_len,
        "eval_tokens": len(tokens),
        "mse_final": facts.get("mse_final"),
    }

    def measure(label: str) -> None:
        value = simulated_perplexity(model, tokens)
        results[label] = value
        print(f"{label}: {value:.2f}", flush=True)
        starts = previous.get("starts", {}) | {start: {**entry, "perplexity": results}}
        RESULTS.write_text(json.dumps({"model": "smollm2-135m", "starts": starts}, indent=2) + "\n")

    results: dict[str, float] = {}
    for label, (weights, acts) in {
        "float": (False, False),
        "weights only": (True, False),
        "activations only": (False, True),
        "all quantized": (True, True),
    }.items():
        model.set_quant(weights=weights, acts=acts)
        measure(label)
    for label, sites in GROUPS.items():
        model.set_quant(weights=True, acts=True)
        for quants in [*model.acts, model.head_acts]:
            for site in sites:
                if site in quants:
                    quants[site].enabled = False
        measure(f"float {label}")


if __name__ == "__main__":
    main()
