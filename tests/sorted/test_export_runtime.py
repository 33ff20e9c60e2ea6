"""The many-depth ONNX bundle of a tiny LLaMA: every depth, fixed/auto/dynamic generation, sizes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edgekit.errors import EdgekitError
from edgekit.models.llama import CausalLMWithCache
from edgekit.runtime.manifest import Manifest
from edgekit.runtime.sorted import SortedModel, dynamic_exit_depths, softmax_confidence
from edgekit.sorted.export import (
    exit_perplexities,
    export_graphs,
    format_spec,
    measure_components,
    segments_of,
    torch_exit_logits,
)
from edgekit.sorted.model import exit_logits, truncated
from tests.sorted.tiny import tiny_llama, token_ids

REPO = Path(__file__).resolve().parents[2]
DEPTHS = [2, 4, 6]


@pytest.fixture(scope="module")
def model() -> CausalLMWithCache:
    return CausalLMWithCache(tiny_llama())


@pytest.fixture(scope="module")
def bundle(model: CausalLMWithCache, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sorted")
    out = root / "bundle"
    paths = export_graphs(model, DEPTHS, out, root / "work")
    info = {
        "depths": DEPTHS,
        "segments": segments_of(DEPTHS),
        "head": "head",
        "num_kv_heads": model.num_kv_heads,
        "head_dim": model.head_dim,
        "thresholds": [0.5, 0.5, 0.5],
        "latency": [
            {"depth": 2, "decode_ms_per_token": 1.0},
            {"depth": 4, "decode_ms_per_token": 2.0},
            {"depth": 6, "decode_ms_per_token": 3.0},
        ],
    }
    Manifest(
        model={"spec": "test:tiny-llama", "task": "causal-lm"},
        recipe={"name": "sorted"},
        device="x86-cpu-onnxruntime",
        formats={"onnx": format_spec(paths, out, info)},
        language_model={"num_layers": 6, "eos_token_ids": []},
        depths=DEPTHS,
    ).write(out)
    return out


def runner_of(bundle: Path) -> SortedModel:
    from edgekit.runtime import load

    return SortedModel.from_session(load(bundle))


@torch.no_grad()
def torch_greedy(model: CausalLMWithCache, prompt: list[int], steps: int, depth: int) -> list[int]:
    sub, ids = truncated(model, depth), list(prompt)
    for _ in range(steps):
        ids.append(int(sub(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def test_every_depth_in_the_runtime_matches_torch(model: CausalLMWithCache, bundle: Path) -> None:
    runner = runner_of(bundle)
    tokens = token_ids(13).numpy()
    with torch.no_grad():
        expected = {d: truncated(model, d)(torch.from_numpy(tokens)).numpy() for d in DEPTHS}
    for depth in DEPTHS:
        np.testing.assert_allclose(runner.logits(tokens, depth), expected[depth], atol=1e-4, rtol=1e-4)
    for depth, logits in runner.all_exit_logits(tokens).items():
        np.testing.assert_allclose(logits, expected[depth], atol=1e-4, rtol=1e-4)


def test_every_weight_is_stored_once(model: CausalLMWithCache, bundle: Path) -> None:
    # the tied embedding / LM head too: the head graph reads the first segment's table transposed
    unique = sum({p.data_ptr(): p.numel() * 4 for p in model.hf_model.parameters()}.values())
    stored = (bundle / "weights.bin").stat().st_size
    assert stored <= unique, (stored, unique)  # norm vectors under 1 KB stay inline in their graphs
    head, first = _external(bundle / "head.onnx"), _external(bundle / "segment_0.onnx")
    assert head and all(first.get(name) == where for name, where in head.items())  # same bytes, same offset


def _external(path: Path) -> dict[str, dict[str, str]]:
    """Initializer name -> its location/offset/length in the shared weights file."""
    model = onnx.load(str(path), load_external_data=False)
    return {
        init.name: {entry.key: entry.value for entry in init.external_data}
        for init in model.graph.initializer
        if init.data_location == onnx.TensorProto.EXTERNAL
    }


def test_fixed_depth_generation_matches_torch(model: CausalLMWithCache, bundle: Path) -> None:
    runner = runner_of(bundle)
    prompt = token_ids(7, seed=4)[0].tolist()
    for depth in (2, 6):
        assert runner.generate(prompt, 8, depth=depth).tokens == torch_greedy(model, prompt, 8, depth)


def test_dynamic_with_extreme_thresholds_equals_shallowest_and_full(bundle: Path) -> None:
    runner = runner_of(bundle)
    prompt = token_ids(7, seed=5)[0].tolist()
    always = runner.generate(prompt, 10, depth="dynamic", thresholds=[0.0])
    never = runner.generate(prompt, 10, depth="dynamic", thresholds=[1.5])
    assert always.tokens == runner.generate(prompt, 10, depth=2).tokens and set(always.depths) == {2}
    assert never.tokens == runner.generate(prompt, 10, depth=6).tokens and set(never.depths) == {6}


def test_mixed_exits_keep_the_cache_exact(model: CausalLMWithCache, bundle: Path) -> None:
    runner = runner_of(bundle)
    prompt = token_ids(6, seed=6)[0].tolist()
    # a threshold at the median shallow confidence of a full-depth run: some tokens exit, some don't
    full = runner.generate(prompt, 12, depth=6).tokens
    sequence = torch.tensor([prompt + full])
    with torch.no_grad():
        shallow = exit_logits(model, sequence, [2])[2][0, len(prompt) - 1 :].numpy()
    limit = float(np.median([softmax_confidence(row) for row in shallow]))
    result = runner.generate(prompt, 12, depth="dynamic", thresholds=[limit, 2.0, 0.0])
    assert {2, 6} <= set(result.depths), result.depths
    # each token is the argmax of the torch sub-model at the depth it exited at
    ids = list(prompt)
    for token, depth in zip(result.tokens, result.depths, strict=True):
        with torch.no_grad():
            assert token == int(truncated(model, depth)(torch.tensor([ids]))[0, -1].argmax())
        ids.append(token)
    # after the pending states are flushed, every layer's cache equals a full-depth prefill's
    state = runner._last_state
    runner.flush(state)
    fed = ids[:-1]  # the last token was generated, never fed back
    with torch.no_grad():
        reference = model.prefill(torch.tensor([fed]))[1:]
    for layer in range(6):
        key, value = state.cache[layer]
        np.testing.assert_allclose(key, reference[2 * layer].numpy(), atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(value, reference[2 * layer + 1].numpy(), atol=1e-4, rtol=1e-4)


def test_auto_depth_picks_the_deepest_within_budget(bundle: Path) -> None:
    runner = runner_of(bundle)
    assert runner.resolve_depth("auto", 2.5) == 4
    assert runner.resolve_depth(None, 10.0) == 6
    with pytest.raises(EdgekitError, match="no depth decodes within 0.5 ms"):
        runner.resolve_depth("auto", 0.5)
    with pytest.raises(EdgekitError, match="not in this bundle"):
        runner.resolve_depth(3, None)
    with pytest.raises(EdgekitError, match="needs a latency budget"):
        runner.resolve_depth("auto", None)


def test_dynamic_perplexity_from_exit_logits(model: CausalLMWithCache) -> None:
    from edgekit.evaluate import perplexity

    tokens = token_ids(40, seed=8)[0].numpy()
    per_depth, dynamic = exit_perplexities(
        torch_exit_logits(model, DEPTHS), tokens, window=16, stride=8, dynamic={"never": [2.0], "always": [0.0]}
    )
    for depth in DEPTHS:
        sub = truncated(model, depth)
        with torch.no_grad():
            expected = perplexity(lambda ids, sub=sub: sub(torch.from_numpy(ids)).numpy(), tokens, 16, 8)
        assert per_depth[depth] == pytest.approx(expected, rel=1e-5)
    assert dynamic["never"]["perplexity"] == pytest.approx(per_depth[6], rel=1e-6)
    assert dynamic["always"]["perplexity"] == pytest.approx(per_depth[2], rel=1e-6)
    assert dynamic["always"]["mean_exit_depth"] == 2.0


def test_component_timings_cover_every_segment(bundle: Path) -> None:
    cost = measure_components(runner_of(bundle), prompt_tokens=8, repeats=2)
    assert len(cost.segment_ms) == len(DEPTHS) and min(cost.segment_ms) > 0 and cost.head_ms > 0
    assert cost.catch_up >= 0 and cost.full_ms() == pytest.approx(sum(cost.segment_ms) + cost.head_ms)


def test_dynamic_exit_depths_rule() -> None:
    confident = np.array([[[10.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])  # position 0 confident, 1 uniform
    chosen = dynamic_exit_depths({2: confident, 4: confident, 6: confident}, [0.9, 0.9, 0.9])
    assert chosen.tolist() == [2, 6]


BLOCKED = """
import sys, importlib.abc

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        for banned in ("torch", "transformers", "edgekit.exporters", "edgekit.models", "edgekit.sorted"):
            if name == banned or name.startswith(banned + "."):
                raise ImportError(f"{name} is blocked in the edge runtime")
        return None

sys.meta_path.insert(0, Block())
import edgekit.runtime as rt

session = rt.load(sys.argv[1])
print(session.generate([5, 6, 7], 4, depth="dynamic"), session.generate([5, 6, 7], 4, budget_ms=2.5))
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
"""


def test_sorted_runtime_runs_without_torch(bundle: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", BLOCKED, str(bundle)], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("[")
