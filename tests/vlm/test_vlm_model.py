"""The zoo VLM's pieces: AnyRes partitions, the three token reductions at one budget, prompts, CLI errors.

The real DINOv2 encoder runs here (one scene); the language model is a tiny random LLaMA with
SmolLM2's tokenizer, so the test never trains the projector or loads the 135M model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgekit.errors import EdgekitError
from edgekit.runtime.hired import HiredSettings, budget
from edgekit.vlm import model as vlm
from edgekit.vlm import scenes


@pytest.fixture(scope="module")
def small_vlm() -> vlm.DinoSmolVLM:
    return _small_vlm()


def _small_vlm() -> vlm.DinoSmolVLM:
    from tiny_llama import tiny_llama_config
    from transformers import AutoTokenizer, LlamaForCausalLM

    from edgekit.models import dinov2, smollm2
    from edgekit.models.llama import CausalLMWithCache
    from edgekit.vlm.hired import ClsAttentionViT

    vit, _ = dinov2.load_model(vlm.PARTITION)
    tokenizer = AutoTokenizer.from_pretrained(smollm2.checkpoint_dir())
    torch.manual_seed(0)
    config = tiny_llama_config(len(tokenizer), tie_word_embeddings=False)
    lm = CausalLMWithCache(LlamaForCausalLM(config).eval())
    return vlm.DinoSmolVLM(ClsAttentionViT(vit), lm, tokenizer, HiredSettings()).eval()


def test_partitions_tile_the_image() -> None:
    image = np.zeros((56, 56, 3), dtype=np.uint8)
    image[28:, 28:] = 255  # only the bottom-right quadrant is white
    parts = vlm.partitions(image)
    assert parts.shape == (5, 3, 112, 112)
    brightness = parts.mean(dim=(1, 2, 3))
    assert brightness[4] > 2.0 and (brightness[1:4] < -1.5).all()  # normalised: white ~ +2, black ~ -1.8
    full = parts[0].mean(0)
    assert full[56:, 56:].mean() > 2.0 and full[:56, :56].mean() < -1.5


def test_item_patches_mark_what_is_not_background() -> None:
    image = np.zeros((56, 56, 3), dtype=np.uint8)
    image[28:35, 28:35] = 255  # one white square at the bottom-right quadrant's top-left
    marked = vlm.item_patches(image)
    assert marked.shape == (5, 64) and marked.dtype == bool
    assert not marked[1:4].any()  # the other three quadrants are black
    assert marked[4].sum() == 4  # 7x7 px of the 28-px quadrant = 28x28 px of its 112-px crop: 2x2 patches
    assert marked[4].reshape(8, 8)[:2, :2].all()
    assert 0 < marked[0].sum() < 4  # the full view sees the square at half that size


def test_scenes_are_deterministic_and_split() -> None:
    first, again = scenes.scene("eval", 3), scenes.scene("eval", 3)
    assert np.array_equal(first.image, again.image) and first.labels == again.labels
    assert first.answer in scenes.NAMES and first.question.startswith("What is in the ")
    assert not np.array_equal(scenes.scene("calib", 3).image, first.image)


def test_pool_grids_are_the_most_square_within_the_share() -> None:
    assert vlm._pool_grid(6) == (2, 3) and vlm._pool_grid(12) == (3, 4) and vlm._pool_grid(13) == (3, 4)
    assert vlm._pool_grid(25) == (5, 5) and vlm._pool_grid(64) == (8, 8)


def test_reductions_meet_the_budget(small_vlm) -> None:
    item = scenes.scene("eval", 0)
    encoded = small_vlm.encode(item.image)
    assert encoded.features.shape == (5, 64, 384) and encoded.late.shape == (5, 64)
    for ratio in (0.1, 0.2, 0.4):
        n = budget(ratio, 5, 64)
        hired, kept = small_vlm.reduce(encoded, "hired", ratio)
        assert sum(len(part) for part in hired) == n
        for index, keep in enumerate(kept):  # each partition keeps its own top late-attention tokens
            if 0 < len(keep) < 64:
                rest = sorted(set(range(64)) - set(keep))
                assert encoded.late[index, keep].min() >= encoded.late[index, rest].max()
        random, _ = small_vlm.reduce(encoded, "random", ratio)
        assert sum(len(part) for part in random) == n
        pooled, _ = small_vlm.reduce(encoded, "pool", ratio)
        assert n - 5 <= sum(len(part) for part in pooled) <= n
    for method in vlm.METHODS:
        parts, _ = small_vlm.reduce(encoded, method, 1.0)
        assert torch.equal(torch.stack(parts), encoded.features)


def test_answer_counts_tokens_and_times_the_first(small_vlm) -> None:
    item = scenes.scene("eval", 1)
    full = small_vlm.answer(item.image, item.question, "hired", 1.0, max_new_tokens=3, stop_at_eos=False)
    cut = small_vlm.answer(item.image, item.question, "hired", 0.2, max_new_tokens=3, stop_at_eos=False)
    assert full.visual_tokens == 320 and cut.visual_tokens == 64
    assert full.prompt_tokens - cut.prompt_tokens == 256
    assert full.new_tokens == cut.new_tokens == 2 and full.ttft_s > 0
    assert full.kv_cache_bytes > cut.kv_cache_bytes
    with pytest.raises(EdgekitError):
        small_vlm.answer(item.image, item.question, "hired", 1.5)
    with pytest.raises(EdgekitError):
        small_vlm.reduce(small_vlm.encode(item.image), "median", 0.2)


def test_cli_errors_are_one_line(edgekit_cli, tmp_path) -> None:
    for args in (
        ["run", "zoo:smollm2-135m", "--image", "scene:0", "--prompt", "q"],
        ["run", "zoo:vlm-dinov2-smollm2", "--image", str(tmp_path / "missing.png"), "--prompt", "q"],
        ["run", "zoo:vlm-dinov2-smollm2", "--image", "scene:0", "--prompt", "q", "--keep", "0"],
        ["run", "zoo:vlm-dinov2-smollm2", "--image", "photo:nope", "--prompt", "q"],
    ):
        result = edgekit_cli(*args)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().startswith("error:") and len(result.stderr.strip().splitlines()) == 1


def test_choice_is_the_most_likely_candidate(small_vlm) -> None:
    item = scenes.scene("eval", 2)
    answer = small_vlm.answer(item.image, item.question, "hired", 0.2, 1, candidates=scenes.NAMES)
    # reference: one fresh full forward per candidate over prompt + candidate tokens (no KV cache)
    visual, _ = small_vlm.reduce(small_vlm.encode(item.image), "hired", 0.2)
    with torch.no_grad():
        embeds, length = small_vlm.prompt_embeds(visual, item.question)
        scores = []
        for name in scenes.NAMES:
            ids = small_vlm._ids(name + "<|im_end|>")
            hidden = torch.cat([embeds, small_vlm.lm.embed_tokens(ids[:-1])[None]], dim=1)
            logits = small_vlm.lm.hf_model(inputs_embeds=hidden).logits[0, length - 1 :]
            scores.append(float(torch.log_softmax(logits, -1).gather(1, ids[:, None]).sum()))
    assert answer.choice == scenes.NAMES[int(np.argmax(scores))]
    assert sorted(scores)[-1] - sorted(scores)[-2] > 1e-4  # not decided by rounding
    assert small_vlm.choose(visual, item.question, scenes.NAMES) == answer.choice  # the benches' shortcut


def test_training_moves_only_the_projector_and_the_merged_adapters() -> None:
    from edgekit.vlm.lora import LoraLinear, merge_lora

    model = _small_vlm()
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if "projector" not in name}
    projector = model.projector.weight.detach().clone()
    record = vlm.train_vlm(model, vlm.TrainBudget(ridge_scenes=2, text_steps=2, steps=1))
    assert all(np.isfinite(record[f"stage{n}_loss_last_20"]) for n in (2, 3))
    assert not torch.equal(model.projector.weight, projector)
    merge_lora(model.lm.hf_model)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    changed = {name for name, p in model.named_parameters() if name in frozen and not torch.equal(p, frozen[name])}
    assert changed and all(name.endswith(("q_proj.weight", "v_proj.weight")) for name in changed)
    assert not any(name.startswith("encoder.") for name in changed)
