"""The LLaVA-Next plug-in on a tiny randomly initialised LLaVA-Next built here."""

from __future__ import annotations

import pytest
import torch

from edgekit.errors import EdgekitError
from edgekit.runtime.hired import budget
from edgekit.vlm.llava_next import _packed_lengths, disable_hired, enable_hired, select_image_tokens

IMAGE_TOKEN = 90


def tiny_llava_next():
    from tiny_llama import tiny_llama_config
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=16, patch_size=4
    )
    text = tiny_llama_config(100, tie_word_embeddings=False, pad_token_id=0)
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN,
        image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]],
        vision_feature_layer=-2,
    )
    torch.manual_seed(0)
    return LlavaNextForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def model_and_inputs():
    model = tiny_llava_next()
    torch.manual_seed(1)
    # one 32x32 image (2x2 AnyRes grid) and one 16x32 image (1x2 grid), padded to 5 partitions
    pixel_values = torch.randn(2, 5, 3, 16, 16)
    image_sizes = torch.tensor([[32, 32], [16, 32]])
    lengths = _packed_lengths(model, pixel_values, image_sizes)
    rows = []
    for length in lengths:
        rows.append([1, 5, 6] + [IMAGE_TOKEN] * length + [7, 8, 9])
    width = max(map(len, rows))
    input_ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    attention_mask = (torch.arange(width)[None] >= torch.tensor([width - len(r) for r in rows])[:, None]).long()
    inputs = dict(input_ids=input_ids, pixel_values=pixel_values, image_sizes=image_sizes)
    inputs["attention_mask"] = attention_mask
    return model, inputs, lengths


def test_budget_one_gives_identical_logits(model_and_inputs) -> None:
    model, inputs, _ = model_and_inputs
    tower = model.model.vision_tower
    with torch.no_grad():
        sdpa = model(**inputs).logits
        tower.set_attn_implementation("eager")  # the one change HiRED makes: attention weights
        plain = model(**inputs).logits
        tower.set_attn_implementation("sdpa")
        enable_hired(model, budget=1.0)
        try:
            ours = model(**inputs).logits
        finally:
            disable_hired(model)
    assert torch.equal(ours, plain)
    torch.testing.assert_close(ours, sdpa, atol=1e-5, rtol=1e-5)
    assert tower.config._attn_implementation == "sdpa"  # disable_hired restored it


def test_lower_budget_sends_fewer_image_tokens_and_generates(model_and_inputs) -> None:
    model, inputs, lengths = model_and_inputs
    enable_hired(model, budget=0.2)
    try:
        kept = select_image_tokens(model, inputs["pixel_values"], inputs["image_sizes"])
        # image 0: 5 partitions of 16 tokens -> N = 16; image 1: 3 partitions -> N = 9 (plus kept newlines)
        side_newlines = [8, 4]  # rows of the unpadded sub-image grids
        for features, full, partitions, rows in zip(kept, lengths, (5, 3), side_newlines, strict=True):
            n = budget(0.2, partitions, 16)
            assert n <= len(features) <= n + rows + 1 < full
        with torch.no_grad():
            logits = model(**inputs).logits
            plain_width = inputs["input_ids"].shape[1]
            assert logits.shape[1] < plain_width
            generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert generated.shape[1] == logits.shape[1] + 3
    finally:
        disable_hired(model)


def test_rejects_what_it_cannot_do(model_and_inputs) -> None:
    model, inputs, _ = model_and_inputs
    with pytest.raises(EdgekitError):
        enable_hired(torch.nn.Linear(2, 2))
    enable_hired(model, budget=0.5)
    try:
        with pytest.raises(EdgekitError):
            model(**inputs, position_ids=torch.zeros_like(inputs["input_ids"]))
    finally:
        disable_hired(model)
