"""HiRED for a user's Hugging Face LLaVA-Next model: ``enable_hired(model, budget=0.2)``.

The plug-in runs the vision tower once with attention weights, selects tokens per image with
:func:`edgekit.vlm.hired.select` (full image = the base partition, sub-images = the AnyRes grid
from ``image_sizes``), and hands the language model only the kept tokens: it packs the features
with the model's own ``pack_image_features`` (unpadding, ``image_newline`` rows), drops the
tokens HiRED dropped and every newline whose row lost all its tokens, removes as many
``<image>`` placeholders from ``input_ids`` and passes the result as ``mm_encoder_outputs``.
With ``budget=1`` nothing is dropped and the model computes exactly what it computes with an
eager-attention vision tower (the one change HiRED needs: sdpa kernels return no attention
weights; against sdpa the logits differ by float rounding only).

Limits, checked with one-line errors: one ``vision_feature_layer`` (an int) and the ``default``
feature strategy (CLS dropped), as llava-v1.6 checkpoints use; ``input_ids`` (not embeddings).
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch

from edgekit.errors import EdgekitError
from edgekit.runtime.hired import HiredSettings
from edgekit.vlm import hired

ATTRIBUTE = "_edgekit_hired"


@dataclass
class _State:
    settings: HiredSettings
    early_layer: int
    late_layer: int
    forward: types.MethodType
    generate: types.MethodType
    attention: str  # the vision tower's attention kernel before (eager is needed for the weights)


def enable_hired(
    model,
    budget: float = 0.2,
    alpha: float = 0.5,
    early_layer: int = 0,
    late_layer: int | None = None,
):
    """Turn HiRED on for ``model`` (a ``LlavaNextForConditionalGeneration``) and return it.

    ``budget`` is r, the kept share of visual tokens; ``late_layer=None`` scales the paper's
    22-of-24 to the vision tower's depth. Calling it again changes the settings.
    """
    from transformers import LlavaNextForConditionalGeneration

    if not isinstance(model, LlavaNextForConditionalGeneration):
        raise EdgekitError(f"enable_hired needs a LlavaNextForConditionalGeneration, got {type(model).__name__}")
    config = model.config
    if not isinstance(config.vision_feature_layer, int):
        raise EdgekitError("HiRED supports one vision_feature_layer (an int), not a list")
    if config.vision_feature_select_strategy != "default":
        raise EdgekitError("HiRED needs vision_feature_select_strategy='default' (the CLS token is its query)")
    settings = HiredSettings(budget, alpha, early_layer, late_layer)
    early, late = settings.layers(int(config.vision_config.num_hidden_layers))
    tower = model.model.vision_tower
    previous = getattr(model, ATTRIBUTE, None)
    forward = previous.forward if previous else model.forward
    generate = previous.generate if previous else model.generate
    attention = previous.attention if previous else tower.config._attn_implementation
    tower.set_attn_implementation("eager")  # sdpa returns no attention weights
    setattr(model, ATTRIBUTE, _State(settings, early, late, forward, generate, attention))
    model.forward = types.MethodType(_forward, model)
    model.generate = types.MethodType(_generate, model)
    return model


def disable_hired(model):
    """Restore the model's own forward and generate."""
    state = getattr(model, ATTRIBUTE, None)
    if state is not None:
        model.forward, model.generate = state.forward, state.generate
        model.model.vision_tower.set_attn_implementation(state.attention)
        delattr(model, ATTRIBUTE)
    return model


def _through_hired(entry: str):
    """The model's own ``forward``/``generate`` (``entry``), fed HiRED's reduced image tokens."""

    def call(self, input_ids=None, pixel_values=None, image_sizes=None, attention_mask=None, **kwargs):
        original = getattr(getattr(self, ATTRIBUTE), entry)
        if pixel_values is None or pixel_values.numel() == 0:
            return original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        _check(input_ids, kwargs)
        ids, mask, encoded = hired_inputs(self, input_ids, pixel_values, image_sizes, attention_mask)
        return original(input_ids=ids, attention_mask=mask, mm_encoder_outputs=encoded, **kwargs)

    return call


_forward, _generate = _through_hired("forward"), _through_hired("generate")


def _check(input_ids, kwargs) -> None:
    if input_ids is None:
        raise EdgekitError("HiRED needs input_ids with the <image> placeholders, not inputs_embeds")
    for key in ("position_ids", "inputs_embeds", "mm_encoder_outputs"):
        if kwargs.get(key) is not None:
            raise EdgekitError(f"HiRED rewrites the image tokens; pass no {key}")


@torch.no_grad()
def select_image_tokens(model, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[torch.Tensor]:
    """The kept, packed, projected image features of each image ([L_i, hidden] each)."""
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
        image_size_to_num_patches,
    )

    state: _State = getattr(model, ATTRIBUTE)
    inner, config = model.model, model.config
    vision = config.vision_config
    counts = [image_size_to_num_patches(size, config.image_grid_pinpoints, vision.image_size) for size in image_sizes]
    if pixel_values.dim() == 5:
        pixel_values = torch.cat([values[:count] for values, count in zip(pixel_values, counts, strict=True)])
    out = inner.vision_tower(pixel_values, output_hidden_states=True, output_attentions=True, return_dict=True)
    features = inner.multi_modal_projector(out.hidden_states[config.vision_feature_layer][:, 1:])
    early = hired.cls_attention(out.attentions, state.early_layer)
    late = hired.cls_attention(out.attentions, state.late_layer)
    side = vision.image_size // vision.patch_size
    tokens = side * side
    newline_marker = torch.tensor([-1.0], dtype=torch.float32)
    packed: list[torch.Tensor] = []
    start = 0
    for index, count in enumerate(counts):
        stop = start + count
        layout = (0, 0)  # a lone base image has no sub-images
        if count > 1:
            layout = get_anyres_image_grid_shape(image_sizes[index], config.image_grid_pinpoints, vision.image_size)
        kept = hired.select(early[start], late[start:stop], (side, side), layout, state.settings)
        # pack token ids with the model's own code, so unpadding and newline rows match exactly
        ids = torch.arange(count * tokens, dtype=torch.float32).reshape(count, tokens, 1)
        sizes = image_sizes[index : index + 1]
        strategy = config.vision_feature_select_strategy
        order = inner.pack_image_features([ids], sizes, strategy, image_newline=newline_marker)[0][0][:, 0]
        wanted = torch.zeros(count * tokens, dtype=torch.bool)
        for partition, keep in enumerate(kept):
            wanted[partition * tokens + keep] = True
        keep_mask = _keep_mask(order, wanted)
        full = inner.pack_image_features([features[start:stop]], sizes, strategy, image_newline=inner.image_newline)
        packed.append(full[0][0][keep_mask])
        start = stop
    return packed


def _keep_mask(order: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """Kept positions of a packed sequence: wanted tokens, and newlines ending a row that kept one."""
    is_newline = order < 0
    token_ids = torch.where(is_newline, torch.zeros_like(order), order).long()
    keep = wanted[token_ids] & ~is_newline
    row_has_token = False
    for position in range(len(order)):
        if is_newline[position]:
            keep[position] = row_has_token
            row_has_token = False
        elif keep[position]:
            row_has_token = True
    return keep


def hired_inputs(model, input_ids, pixel_values, image_sizes, attention_mask=None):
    """(input_ids, attention_mask, mm_encoder_outputs) with only HiRED's image tokens.

    Rows keep their order; when rows end up with different lengths they are left-padded with
    the text config's pad token (attention 0), as generation expects.
    """
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    features = select_image_tokens(model, pixel_values, image_sizes)
    full_lengths = _packed_lengths(model, pixel_values, image_sizes)
    image_token = model.config.image_token_id
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    rows, masks = [], []
    image = 0
    for row_ids, row_mask in zip(input_ids, attention_mask, strict=True):
        keep = torch.ones_like(row_ids, dtype=torch.bool)
        positions = (row_ids == image_token).nonzero().flatten().tolist()
        cursor = 0
        while cursor < len(positions):
            if image >= len(features):
                raise EdgekitError("more <image> placeholders than images")
            length, kept = full_lengths[image], len(features[image])
            keep[positions[cursor + kept : cursor + length]] = False
            cursor += length
            image += 1
        rows.append(row_ids[keep])
        masks.append(row_mask[keep])
    if image != len(features):
        raise EdgekitError(f"{len(features)} images but placeholders for {image}")
    width = max(len(row) for row in rows)
    pad = model.config.text_config.pad_token_id
    pad = 0 if pad is None else int(pad)
    ids = torch.stack([torch.cat([row.new_full((width - len(row),), pad), row]) for row in rows])
    mask = torch.stack([torch.cat([m.new_zeros(width - len(m)), m]) for m in masks])
    return ids, mask, {"image": BaseModelOutputWithPooling(pooler_output=features)}


def _packed_lengths(model, pixel_values, image_sizes) -> list[int]:
    """Placeholder count the processor wrote for each image (the unmodified packed length)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config, vision = model.config, model.config.vision_config
    side = vision.image_size // vision.patch_size
    lengths = []
    for size in image_sizes:
        count = image_size_to_num_patches(size, config.image_grid_pinpoints, vision.image_size)
        ids = torch.zeros(count, side * side, 1)
        marker = torch.zeros(1)
        packed = model.model.pack_image_features([ids], size[None], config.vision_feature_select_strategy, marker)
        lengths.append(int(packed[0][0].shape[0]))
    return lengths
