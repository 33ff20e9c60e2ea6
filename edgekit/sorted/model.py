"""Sub-models of one LLaMA-family network: f_n = the first n decoder layers + final norm + LM head.

Sorted fine-tuning (SoFT) trains every configured depth at once, so the logits of all depths come
from ONE pass through the layers, with the shared final norm and the one LM head applied at each
exit (no extra heads). The computation is :class:`~edgekit.models.llama.CausalLMWithCache`'s own
building blocks, so what is trained here is exactly what the exporter traces.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from edgekit.errors import EdgekitError
from edgekit.models.llama import CausalLMWithCache


def default_depths(num_layers: int) -> list[int]:
    """Every tenth of the network from 40% to 100%: 12, 15, ..., 30 for a 30-layer model.

    The paper's LLaMA-2-13B (40 layers) uses 12, 16, ..., 40: the same 40%..100% span.
    """
    return sorted({max(1, round(num_layers * tenth / 10)) for tenth in range(4, 11)})


def check_depths(depths: Sequence[int], num_layers: int) -> list[int]:
    """Sorted, de-duplicated depths, each within 1..num_layers (a user error otherwise)."""
    chosen = sorted({int(depth) for depth in depths})
    if not chosen:
        raise EdgekitError("depths must name at least one sub-model depth")
    bad = [depth for depth in chosen if not 1 <= depth <= num_layers]
    if bad:
        raise EdgekitError(f"depth {bad[0]} is outside 1..{num_layers} (the model has {num_layers} layers)")
    return chosen


def exit_hidden_states(
    model: CausalLMWithCache, input_ids: torch.Tensor, depths: Sequence[int]
) -> dict[int, torch.Tensor]:
    """Hidden states [B, S, d] after each layer count in ``depths``, from one causal pass."""
    wanted = set(int(depth) for depth in depths)
    length = input_ids.shape[1]
    hidden = model.embed_tokens(input_ids)
    cos, sin = model._rope(0, length)
    mask = model._causal_mask(0, length, hidden.dtype).to(hidden.device)
    exits: dict[int, torch.Tensor] = {}
    for index, layer in enumerate(model.layers[: max(wanted)]):
        hidden, _, _ = model._layer(layer, hidden, cos, sin, mask, None, None)
        if index + 1 in wanted:
            exits[index + 1] = hidden
    return exits


def exit_logits(model: CausalLMWithCache, input_ids: torch.Tensor, depths: Sequence[int]) -> dict[int, torch.Tensor]:
    """Logits [B, S, V] of every sub-model f_n, n in ``depths`` (shared norm + head at each exit)."""
    return {depth: model._head(hidden) for depth, hidden in exit_hidden_states(model, input_ids, depths).items()}


def sorted_loss(
    model: CausalLMWithCache, input_ids: torch.Tensor, labels: torch.Tensor, depths: Sequence[int]
) -> tuple[torch.Tensor, dict[int, float]]:
    """SoFT's objective: the mean over depths of each sub-model's next-token loss.

    ``labels`` is ``input_ids`` with positions that carry no loss set to -100 (prompt tokens of
    instruction data, padding); the shift to next-token targets happens here. Returns the loss
    to back-propagate and each depth's loss value.
    """
    targets = labels[:, 1:].reshape(-1)
    losses: dict[int, torch.Tensor] = {}
    for depth, hidden in exit_hidden_states(model, input_ids, depths).items():
        logits = model._head(hidden[:, :-1])
        losses[depth] = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), targets, ignore_index=-100
        )
    total = torch.stack(list(losses.values())).mean()
    return total, {depth: float(loss.detach()) for depth, loss in losses.items()}


def truncated(model: CausalLMWithCache, depth: int) -> CausalLMWithCache:
    """f_depth as a stand-alone module sharing ``model``'s weights (for export and evaluation)."""
    return CausalLMWithCache(model.hf_model, num_layers=depth).eval()
