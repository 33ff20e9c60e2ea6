"""HiRED's late layer and α on the zoo VLM, chosen on held-out training-split scenes.

HiRED ranks tokens by a late layer's CLS attention (the paper: 22 of 24, here scaled to 11 of 12)
and gives the full image a share α of the budget. This sweeps both at r = 0.2 on ``calib`` scenes
past every scene the VLM was trained on (never the evaluation scenes of bench/hired.py) and
reports the closed-vocabulary accuracy per setting, so a setting is chosen before evaluation.

    PYTHONPATH=. python bench/hired_layers.py [--scenes 40] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from edgekit.runtime.hired import HiredSettings
from edgekit.vlm import hired, scenes
from edgekit.vlm import model as vlm

RESULTS = Path(__file__).parent / "results"
FIRST_SCENE = 1000  # past the training scenes: ridge 150 + text 200 + visual 96 by default
LAYERS = (4, 6, 8, 9, 10, 11)
ALPHAS = (0.5, 0.25)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = vlm.load_model()
    budget = model.training_record["budget"]
    used = budget["ridge_scenes"] + budget["text_steps"] + budget["steps"]
    if used > FIRST_SCENE:
        raise SystemExit(f"error: the VLM trained on calib scenes up to {used}, past the sweep's {FIRST_SCENE}")
    right: dict[str, list[bool]] = {}
    for index in range(FIRST_SCENE, FIRST_SCENE + args.scenes):
        item = scenes.scene("calib", index)
        with torch.no_grad():
            out = model.encoder.vit(pixel_values=vlm.partitions(item.image), output_attentions=True, return_dict=True)
        features = out.last_hidden_state[:, 1:]
        early = hired.cls_attention(out.attentions, 0)
        for layer in LAYERS:
            late = hired.cls_attention(out.attentions, layer)
            for alpha in ALPHAS:
                kept = hired.select(early[0], late, vlm.GRID, vlm.LAYOUT, HiredSettings(0.2, alpha, 0, layer))
                choice = model.choose([features[i, k] for i, k in enumerate(kept)], item.question, scenes.NAMES)
                right.setdefault(f"late={layer},alpha={alpha:g}", []).append(choice == item.answer)
        if (index - FIRST_SCENE + 1) % 10 == 0:
            print(index - FIRST_SCENE + 1, "scenes", {k: round(float(np.mean(v)), 3) for k, v in right.items()})
    accuracy = {key: float(np.mean(values)) for key, values in right.items()}
    result = {
        "purpose": __doc__.splitlines()[0],
        "split": "calib",
        "first_scene": FIRST_SCENE,
        "scenes": args.scenes,
        "ratio": 0.2,
        "choice_accuracy": accuracy,
        "standard_error": float(np.sqrt(0.25 / args.scenes)),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "hired_layers.json").write_text(json.dumps(result, indent=1) + "\n")
    for key, value in sorted(accuracy.items(), key=lambda kv: -kv[1]):
        print(f"{key:22s} {value:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
