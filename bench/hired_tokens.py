"""Which visual tokens does the zoo VLM answer from: the items' patches or the background's?

bench/hired.py finds HiRED, which keeps almost only item patches, below random dropping, which
keeps about half background. This keeps the same number of tokens per partition as random
dropping at r = 0.2 (an even split), drawn at random from (a) item patches only, (b) background
patches only, (c) any patch, and compares the closed-vocabulary accuracy on the evaluation scenes.
A partition with fewer patches of the wanted kind than its quota keeps all of that kind.

    PYTHONPATH=. python bench/hired_tokens.py [--scenes 60] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from edgekit.vlm import model as vlm
from edgekit.vlm import scenes

RESULTS = Path(__file__).parent / "results"
KINDS = ("items", "background", "any")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ratio", type=float, default=0.2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = vlm.load_model()
    quotas = model.quotas("random", args.ratio)
    rng = np.random.default_rng(0)
    right: dict[str, list[bool]] = {kind: [] for kind in KINDS}
    kept_counts: dict[str, list[int]] = {kind: [] for kind in KINDS}
    for index, item in enumerate(scenes.scenes("eval", args.scenes)):
        encoded = model.encode(item.image)
        on_item = vlm.item_patches(item.image)
        for kind in KINDS:
            visual = []
            for part, quota in enumerate(quotas):
                pool = {"items": on_item[part], "background": ~on_item[part], "any": np.ones_like(on_item[part])}[kind]
                candidates = np.flatnonzero(pool)
                keep = np.sort(rng.choice(candidates, size=min(quota, len(candidates)), replace=False))
                visual.append(encoded.features[part, torch.from_numpy(keep)])
            right[kind].append(model.choose(visual, item.question, scenes.NAMES) == item.answer)
            kept_counts[kind].append(sum(len(v) for v in visual))
        if (index + 1) % 10 == 0:
            print(index + 1, "scenes", {k: round(float(np.mean(v)), 3) for k, v in right.items()}, flush=True)
    result = {
        "purpose": __doc__.splitlines()[0],
        "scenes": args.scenes,
        "ratio": args.ratio,
        "quota_per_partition": quotas,
        "choice_accuracy": {kind: float(np.mean(v)) for kind, v in right.items()},
        "mean_tokens_kept": {kind: float(np.mean(v)) for kind, v in kept_counts.items()},
        "standard_error": float(np.sqrt(0.25 / args.scenes)),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "hired_tokens.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
