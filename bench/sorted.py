"""SoFT vs SFT vs the pretrained model, at every depth, in torch and in the exported runtime.

    python bench/sorted.py --phase train --method soft   # or sft; both are cached
    python bench/sorted.py --phase measure               # perplexities, export, latencies -> JSON

Training runs at a reduced budget (BUDGET below, recorded in the JSON): the machine is a shared
2-core CPU. SFT is the same trainer with only the full depth: same data, steps, optimiser, seed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgekit.models.llama import CausalLMWithCache  # noqa: E402
from edgekit.models.smollm2 import load_hf, source_hash  # noqa: E402
from edgekit.sorted.recipe import Config, fine_tuned  # noqa: E402

RESULTS = REPO / "bench" / "results" / "sorted.json"
# Reduced budget (the recipe default is 80 steps x 4 x 128): what this shared machine affords.
BUDGET = {"steps": 32, "batch": 2, "seq_len": 128, "grad_accum": 1, "lr": 1e-4}


def method_config(method: str, num_layers: int) -> Config:
    config = Config(**BUDGET)
    if method == "sft":
        config.depths = [num_layers]
    return config


def trained(method: str) -> tuple[CausalLMWithCache, dict]:
    hf_model, tokenizer, entry = load_hf()
    model = CausalLMWithCache(hf_model)
    config = method_config(method, model.num_layers)
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    result, where = fine_tuned(
        model, tokenizer, config, source_hash(entry), separator_id=endoftext, description=f"{method} training"
    )
    return model, {"weights": str(where), "seconds": result.seconds, "history": result.history}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", choices=("train", "measure"), required=True)
    parser.add_argument("--method", choices=("soft", "sft"))
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.phase == "train":
        _, record = trained(args.method)
        print(json.dumps({k: v for k, v in record.items() if k != "history"}))
        return
    raise SystemExit("measure phase: not yet")


if __name__ == "__main__":
    main()
