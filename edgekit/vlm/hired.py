"""HiRED in torch: CLS-attention rows from a Hugging Face ViT and the same token selection.

The selection rule lives in :mod:`edgekit.runtime.hired` (numpy, for the device); this module
computes the attention rows and the region shares with torch, reuses the runtime's integer
allocation (pure bookkeeping on k+1 numbers) and ranks tokens with ``torch.sort(stable=True)``,
which breaks ties towards the lower index exactly as the runtime's stable ``argsort`` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from edgekit.errors import EdgekitError
from edgekit.runtime.hired import HiredSettings, allocate, region_index

__all__ = ["ClsAttentionViT", "HiredSettings", "cls_attention", "region_shares", "select", "gather"]


def cls_attention(attentions: Sequence[torch.Tensor], layer: int, prefix: int = 1) -> torch.Tensor:
    """[B, P]: layer ``layer``'s attention from the CLS query to the patch keys, heads summed.

    ``attentions`` is a transformers ``output_attentions`` tuple ([B, heads, S, S] per layer);
    ``prefix`` tokens (CLS, registers) precede the patches.
    """
    return attentions[layer][:, :, 0, prefix:].sum(dim=1)


def region_shares(early_cls_full: torch.Tensor, patch_grid: tuple[int, int], layout: tuple[int, int]) -> torch.Tensor:
    """Early CLS attention mass of the full image over each sub-image's 2-D region, [k]."""
    if layout[0] * layout[1] == 0:  # no sub-images
        return torch.zeros(0, dtype=torch.float64)
    regions = torch.from_numpy(region_index(patch_grid, layout)).to(early_cls_full.device)
    scores = early_cls_full.reshape(-1).to(torch.float64)
    return torch.zeros(layout[0] * layout[1], dtype=torch.float64, device=scores.device).index_add_(0, regions, scores)


def top_tokens(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` highest scores, ascending; ties to the lower index."""
    order = torch.sort(scores.to(torch.float32), descending=True, stable=True).indices
    return torch.sort(order[: int(count)]).values


def select(
    early_cls_full: torch.Tensor,
    late_cls: torch.Tensor,
    patch_grid: tuple[int, int],
    layout: tuple[int, int],
    settings: HiredSettings = HiredSettings(),
) -> list[torch.Tensor]:
    """Kept patch indices per partition (full image, then sub-images row-major), as the runtime's."""
    partitions = layout[0] * layout[1] + 1
    tokens = patch_grid[0] * patch_grid[1]
    if tuple(late_cls.shape) != (partitions, tokens):
        raise EdgekitError(f"late CLS attention is {list(late_cls.shape)}, expected [{partitions}, {tokens}]")
    shares = region_shares(early_cls_full, patch_grid, layout).cpu().numpy()
    quotas = allocate(shares, tokens, settings)
    return [top_tokens(late_cls[index], int(quota)) for index, quota in enumerate(np.asarray(quotas))]


def gather(features: torch.Tensor, kept: list[torch.Tensor]) -> torch.Tensor:
    """[k+1, T, D] features -> [Σ kept, D], partition by partition."""
    return torch.cat([features[index, keep] for index, keep in enumerate(kept)], dim=0)


class ClsAttentionViT(nn.Module):
    """A Hugging Face ViT (DINOv2, CLIP vision) returning its patch features and two CLS rows.

    ``forward(pixel_values[B,3,H,W]) -> (patch_features[B,P,D], early_cls[B,P], late_cls[B,P])``:
    what an exported encoder hands the on-device HiRED selection. ``feature_layer=None`` takes
    the final (normed) hidden state; an int takes that entry of ``hidden_states`` (LLaVA's -2).
    """

    def __init__(
        self, vit: nn.Module, settings: HiredSettings = HiredSettings(), feature_layer: int | None = None
    ) -> None:
        super().__init__()
        self.vit = vit
        depth = int(vit.config.num_hidden_layers)
        self.early_layer, self.late_layer = settings.layers(depth)
        self.feature_layer = feature_layer
        if getattr(vit.config, "_attn_implementation", "eager") != "eager":
            vit.set_attn_implementation("eager")  # sdpa/flash kernels return no attention weights
        self.eval()

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.vit(
            pixel_values=pixel_values,
            output_attentions=True,
            output_hidden_states=self.feature_layer is not None,
            return_dict=True,
        )
        hidden = out.last_hidden_state if self.feature_layer is None else out.hidden_states[self.feature_layer]
        return (
            hidden[:, 1:],
            cls_attention(out.attentions, self.early_layer),
            cls_attention(out.attentions, self.late_layer),
        )
