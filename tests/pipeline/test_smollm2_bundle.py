"""The real SmolLM2 (first layers, real weights and tokenizer) through the whole export pipeline:
the bundle's decode graph and KV cache must generate what the torch model generates."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgekit import pipeline, runtime

pytestmark = pytest.mark.slow

FACTORY = """
from edgekit.models import load
from edgekit.models.llama import CausalLMWithCache


def two_layers():
    bundle = load("zoo:smollm2-135m")
    module = CausalLMWithCache(bundle.module.hf_model, num_layers=2).eval()
    meta = {**bundle.meta, "num_layers": 2}
    return bundle.replace(spec="smollm2-135m[:2]", module=module, meta=meta)
"""

PROMPTS = ["The capital of France is", "Water boils at a temperature of"]


@pytest.fixture(scope="module")
def lm_bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("smol")
    (root / "smol_factory.py").write_text(FACTORY)
    sys.path.insert(0, str(root))
    try:
        plan = pipeline.plan_export(
            "smol_factory:two_layers", "fp32", "x86-cpu-onnxruntime", root / "bundle", "onnx", eval_samples=4
        )
        return pipeline.run_export(plan).out
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("smol_factory", None)


@torch.no_grad()
def torch_greedy(module, ids: list[int], steps: int) -> list[int]:
    tokens = list(ids)
    for _ in range(steps):
        tokens.append(int(module(torch.tensor([tokens])).numpy()[0, -1].argmax()))
    return tokens[len(ids) :]


def test_bundle_generates_like_torch(lm_bundle: Path):
    from edgekit.models import load
    from edgekit.models.llama import CausalLMWithCache

    manifest = runtime.Manifest.read(lm_bundle)
    assert set(manifest.formats["onnx"].graphs) == {"prefill", "decode"}
    assert manifest.language_model["tokenizer"] == "tokenizer.json"
    session = runtime.load(lm_bundle)
    reference = CausalLMWithCache(load("zoo:smollm2-135m").module.hf_model, num_layers=2).eval()
    for prompt in PROMPTS:
        ids = session.tokenizer.encode(prompt).ids
        assert session.generate(ids, 8, stop_at_eos=False) == torch_greedy(reference, ids, 8)


def test_prefill_logits_match_torch_and_quality_is_reported(lm_bundle: Path):
    report = (lm_bundle / "report.json").read_text()
    assert '"metric": "perplexity"' in report
    session = runtime.load(lm_bundle)
    ids = np.asarray([session.tokenizer.encode(PROMPTS[0]).ids], dtype=np.int64)
    logits = session.run({"input_ids": ids})["logits"]
    assert logits.shape[:2] == ids.shape and np.isfinite(logits).all()
