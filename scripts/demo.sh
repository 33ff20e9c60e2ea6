#!/usr/bin/env bash
# The main job on a built-in model: export fmnist-cnn with plain int8 PTQ for the Snapdragon NPU
# profile to ONNX QDQ and ExecuTorch, verify it three ways, and print the report summary.
set -euo pipefail
cd "$(dirname "$0")/.."
EDGEKIT=.venv/bin/edgekit
OUT=out/demo-fmnist-cnn-ptq-int8
$EDGEKIT zoo list
$EDGEKIT export zoo:fmnist-cnn --recipe ptq-int8 --device snapdragon-8gen3-npu --format all --eval-samples 1000 --out "$OUT" --force
$EDGEKIT inspect "$OUT"
.venv/bin/python - "$OUT" <<'PY'
import sys

import numpy as np

from edgekit import data
from edgekit.data.fashion_mnist import CLASSES
from edgekit.models.fmnist import preprocess

item = data.items("fashion-mnist", "eval", 1)[0]
np.savez("out/demo-input.npz", x=preprocess(item.raw)["x"].numpy())
print(f"sample input: a Fashion-MNIST test image of class {CLASSES[item.target]!r}")
PY
$EDGEKIT run "$OUT" --input out/demo-input.npz
echo "report: $OUT/report.md"
