"""Why HiRED trails random dropping on the zoo VLM: its allocation or its ranking?

HiRED differs from the random baseline in two ways at once: how many tokens each partition keeps
(the full image ⌊α·N⌋, each sub-image a share by early CLS attention, against an even split) and
which tokens a partition keeps (the top of the late layer's CLS attention, against a random draw).
This crosses the two at one budget, on the same evaluation scenes, answered by the closed-vocabulary
choice: (HiRED quotas | even quotas) x (top attention | random), plus all tokens. Every
configuration sees the same scenes, so differences are paired; their standard errors are reported.
``kept_token_cosine``: how alike the tokens a configuration keeps inside a sub-image are (mean
pairwise cosine of their features), i.e. how much of its budget repeats the same information.

    PYTHONPATH=. python bench/hired_factors.py [--scenes 200] [--ratio 0.2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from _shared import rerun_command

from edgekit.runtime.hired import HiredSettings, allocate
from edgekit.vlm import hired, scenes
from edgekit.vlm import model as vlm

RESULTS = Path(__file__).parent / "results"
QUOTAS = ("hired", "even")
RANKINGS = ("attention", "random")


def paired(right: dict[str, list[bool]], a: str, b: str) -> dict[str, float]:
    """Accuracy difference a - b over the same scenes and its standard error."""
    diff = np.asarray(right[a], dtype=float) - np.asarray(right[b], dtype=float)
    return {"difference": float(diff.mean()), "standard_error": float(diff.std(ddof=1) / np.sqrt(len(diff)))}


def redundancy(visual: list[torch.Tensor]) -> float:
    """Mean pairwise cosine similarity of the kept tokens within each sub-image, averaged."""
    values = []
    for tokens in visual[1:]:
        if len(tokens) > 1:
            unit = torch.nn.functional.normalize(tokens, dim=-1)
            similarity = unit @ unit.T
            values.append(float(similarity[~torch.eye(len(tokens), dtype=torch.bool)].mean()))
    return float(np.mean(values))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = vlm.load_model()
    settings = HiredSettings(args.ratio, model.settings.alpha, model.settings.early_layer, model.settings.late_layer)
    even = model.quotas("random", args.ratio)
    rng = np.random.default_rng(0)
    names = ["full"] + [f"{quota} quotas, {ranking}" for quota in QUOTAS for ranking in RANKINGS]
    right: dict[str, list[bool]] = {name: [] for name in names}
    similar: dict[str, list[float]] = {name: [] for name in names}
    for index, item in enumerate(scenes.scenes("eval", args.scenes)):
        encoded = model.encode(item.image)
        shares = hired.region_shares(encoded.early[0], vlm.GRID, vlm.LAYOUT).numpy()
        counts = {"hired": [int(c) for c in allocate(shares, vlm.TOKENS, settings)], "even": even}
        choices = {"full": list(encoded.features)}
        for quota in QUOTAS:
            for ranking in RANKINGS:
                kept = [
                    hired.top_tokens(encoded.late[part], count)
                    if ranking == "attention"
                    else torch.from_numpy(np.sort(rng.choice(vlm.TOKENS, size=count, replace=False)))
                    for part, count in enumerate(counts[quota])
                ]
                choices[f"{quota} quotas, {ranking}"] = [encoded.features[part, k] for part, k in enumerate(kept)]
        for name, visual in choices.items():
            right[name].append(model.choose(visual, item.question, scenes.NAMES) == item.answer)
            similar[name].append(redundancy(visual))
        if (index + 1) % 20 == 0:
            print(index + 1, "scenes", {k: round(float(np.mean(v)), 3) for k, v in right.items()}, flush=True)
    result = {
        "purpose": __doc__.splitlines()[0],
        "command": rerun_command(),
        "scenes": args.scenes,
        "ratio": args.ratio,
        "settings": {"alpha": settings.alpha, "early": settings.early_layer, "late": model.encoder.late_layer},
        "choice_accuracy": {name: float(np.mean(v)) for name, v in right.items()},
        "kept_token_cosine": {name: float(np.mean(v)) for name, v in similar.items()},
        "paired": {
            f"{factor}: {a} - {b}": paired(right, a, b)
            for factor, a, b in (
                ("allocation", "hired quotas, attention", "even quotas, attention"),
                ("allocation", "hired quotas, random", "even quotas, random"),
                ("ranking", "hired quotas, attention", "hired quotas, random"),
                ("ranking", "even quotas, attention", "even quotas, random"),
                ("HiRED vs all tokens", "hired quotas, attention", "full"),
            )
        },
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "hired_factors.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
