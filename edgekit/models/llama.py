"""An export-friendly LLaMA decoder with an explicit key/value cache.

Hugging Face's ``LlamaForCausalLM.forward`` builds its causal mask with indexing, takes ``Cache``
objects and branches on python state, which breaks ``torch.export`` with dynamic shapes and
pt2e calibration (``aten.index`` → IndexError). :class:`CausalLMWithCache` re-implements the same
computation on the *same* submodules (so weights, fake-quant wrappers and swapped ``nn.Linear``
modules are shared) with plain tensors in and out: no mask indexing, RoPE computed from positions,
the past length read from the past tensor's shape.

Graphs to export (see :class:`PrefillGraph` and :class:`DecodeGraph`):

- ``prefill(input_ids[1, S]) -> (logits[1, S, V], k_0, v_0, ..., k_{L-1}, v_{L-1})``
- ``decode(input_ids[1, 1], k_0, v_0, ...) -> (logits[1, 1, V], k_0', v_0', ...)``

with every ``k_i``/``v_i`` shaped ``[1, n_kv_heads, T, head_dim]`` (keys after RoPE).
"""

from __future__ import annotations

import torch
from torch import nn

from edgekit.errors import EdgekitError

# Additive mask for future positions. Finite and moderate (not -inf or finfo.min) so that a
# quantizer calibrating the masked attention scores sees a usable range; exp(-1e4) is exactly 0
# in float32, so the result equals the -inf mask.
MASK_VALUE = -1.0e4

SUPPORTED_ROPE = ("default", "linear", "llama3")


def _rope_inverse_frequencies(config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin scale for RoPE, from the config alone."""
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if rope_type == "default":
        theta = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
        return (1.0 / theta**exponents).to(torch.float32), 1.0
    if rope_type in SUPPORTED_ROPE:
        # Static (position-independent) scalings: reuse transformers' formulas, they are pure math.
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
        return inv_freq.to(torch.float32), float(scaling)
    raise EdgekitError(f"RoPE type '{rope_type}' is not supported for export (supported: {', '.join(SUPPORTED_ROPE)})")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class CausalLMWithCache(nn.Module):
    """LLaMA-family causal LM over a transformers model's submodules, with a tensor KV cache.

    ``num_layers`` keeps only the first ``n`` decoder layers (then the final norm and the LM head):
    the sub-models sorted / early-exit recipes export.
    """

    def __init__(self, hf_model: nn.Module, num_layers: int | None = None) -> None:
        super().__init__()
        config = hf_model.config
        base = hf_model.model
        total = len(base.layers)
        n = total if num_layers is None else int(num_layers)
        if not 1 <= n <= total:
            raise EdgekitError(f"num_layers must be between 1 and {total}, got {num_layers}")
        self.config = config
        # Kept for recipes that need the original (e.g. a sub-model of other depth), but not
        # registered as a submodule: its parameters would appear twice in state_dict and exports.
        object.__setattr__(self, "_hf_model", hf_model)
        self.embed_tokens = base.embed_tokens
        self.layers = nn.ModuleList(list(base.layers)[:n])
        self.norm = base.norm
        self.lm_head = hf_model.lm_head
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.num_heads)
        self.groups = self.num_heads // self.num_kv_heads
        self.scaling = self.head_dim**-0.5
        inv_freq, self.rope_scaling = _rope_inverse_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, recurse: bool = True):
        """Moves and casts (``to``, ``cpu``, ``half``...) reach the whole wrapped model too, not only
        the layers this one runs (a sub-model's deeper layers, the transformers rotary buffers)."""
        if isinstance(self._hf_model, nn.Module):
            self._hf_model._apply(fn, recurse)
        return super()._apply(fn, recurse)

    @property
    def hf_model(self) -> nn.Module:
        """The transformers model whose submodules this one runs (shared, not copied)."""
        return self._hf_model

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    # -- building blocks -------------------------------------------------------------------
    def _rope(self, start: int | torch.SymInt, length: int | torch.SymInt) -> tuple[torch.Tensor, ...]:
        """cos/sin [1, 1, length, head_dim] for positions start .. start+length-1 (no gather)."""
        positions = torch.arange(length, dtype=torch.float32, device=self.inv_freq.device) + start
        freqs = positions[:, None] * self.inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)[None, None]
        return angles.cos() * self.rope_scaling, angles.sin() * self.rope_scaling

    def _layer(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        past_k: torch.Tensor | None,
        past_v: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn = layer.self_attn
        batch, length = hidden.shape[0], hidden.shape[1]
        x = layer.input_layernorm(hidden)
        # Grouped-query attention as a broadcast over a group axis: q is [B, kv, groups, S, d] and
        # k/v are [B, kv, 1, T, d]. Repeating K/V (expand+reshape, as transformers does) or stacking
        # the group into the row axis both leave stride guards torch.export cannot prove for a
        # dynamic length; this form exports with dynamic sequence and past lengths.
        q = attn.q_proj(x).view(batch, length, self.num_kv_heads, self.groups, self.head_dim)
        q = q.permute(0, 2, 3, 1, 4)
        k = attn.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin  # cos/sin [1, 1, S, d] broadcast from the right
        k = k * cos + _rotate_half(k) * sin
        if past_k is not None:
            k = torch.cat((past_k, k), dim=2)
            v = torch.cat((past_v, v), dim=2)
        scores = torch.matmul(q, k[:, :, None].transpose(-1, -2)) * self.scaling  # [B, kv, g, S, T]
        if mask is not None:
            scores = scores + mask
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, v[:, :, None])  # [B, kv, g, S, d]
        out = out.permute(0, 3, 1, 2, 4).reshape(batch, length, self.num_heads * self.head_dim)
        hidden = hidden + attn.o_proj(out)
        mlp = layer.mlp
        x = layer.post_attention_layernorm(hidden)
        hidden = hidden + mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
        return hidden, k, v

    @staticmethod
    def _causal_mask(start: int | torch.SymInt, length: int | torch.SymInt, dtype: torch.dtype) -> torch.Tensor:
        """Additive [1, 1, length, start+length] mask from position comparisons (no indexing)."""
        queries = torch.arange(length) + start
        keys = torch.arange(start + length)
        return ((keys[None, :] > queries[:, None]).to(dtype) * MASK_VALUE)[None, None]

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))

    # -- the graphs ------------------------------------------------------------------------
    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Logits for every position plus the per-layer keys/values of the whole prompt."""
        hidden, cache = self.prefill_hidden(self.embed_tokens(input_ids))
        return (self._head(hidden), *cache)

    def prefill_hidden(self, hidden: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The decoder layers over input embeddings: final hidden states (before the norm) and the
        per-layer keys/values. Separate from :meth:`prefill` so callers with their own embeddings
        (a VLM's projected image tokens) run the very same computation."""
        length = hidden.shape[1]
        cos, sin = self._rope(0, length)
        mask = self._causal_mask(0, length, hidden.dtype)
        cache: list[torch.Tensor] = []
        for layer in self.layers:
            hidden, k, v = self._layer(layer, hidden, cos, sin, mask, None, None)
            cache += [k, v]
        return hidden, cache

    def decode(self, input_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """New tokens after ``past`` (k_0, v_0, k_1, ...); positions start at the past length.

        The usual graph has one token (``input_ids`` [1, 1]): a single query may attend to every
        past position and itself, so it has no mask. A longer chunk gets the causal mask (the
        branch is on a static shape, so each exported graph holds one path).
        """
        if len(past) != 2 * self.num_layers:
            raise ValueError(f"decode needs {2 * self.num_layers} past tensors, got {len(past)}")
        hidden = self.embed_tokens(input_ids)
        start, length = past[0].shape[2], input_ids.shape[1]
        cos, sin = self._rope(start, length)
        mask = None if length == 1 else self._causal_mask(start, length, hidden.dtype)
        cache: list[torch.Tensor] = []
        for index, layer in enumerate(self.layers):
            hidden, k, v = self._layer(layer, hidden, cos, sin, mask, past[2 * index], past[2 * index + 1])
            cache += [k, v]
        return (self._head(hidden), *cache)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, S, V]: the prefill logits (the unused cache outputs trace away)."""
        return self.prefill(input_ids)[0]

    # -- helpers for exporters and runtimes ------------------------------------------------
    def cache_names(self, prefix: str = "past") -> list[str]:
        """``[prefix_key_0, prefix_value_0, ...]``: stable names for the cache graph edges."""
        return [f"{prefix}_{kind}_{i}" for i in range(self.num_layers) for kind in ("key", "value")]

    def empty_cache(self, length: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        """Zero past tensors of ``length`` positions: example inputs for exporting ``decode``."""
        shape = (1, self.num_kv_heads, length, self.head_dim)
        return [torch.zeros(shape, dtype=dtype) for _ in range(2 * self.num_layers)]


def _max_positions(model: CausalLMWithCache) -> int:
    return int(getattr(model.config, "max_position_embeddings", 2048) or 2048)


class PrefillGraph(nn.Module):
    """``forward = prefill``, so exporters see a plain module with one tensor input.

    ``example_inputs()``, ``dynamic_shapes()``, ``input_names`` and ``output_names`` are what
    ``torch.export.export`` / ``torch.onnx.export(dynamo=True)`` need for a dynamic sequence.
    """

    def __init__(self, model: CausalLMWithCache) -> None:
        super().__init__()
        self.model = model
        self.eval()  # an export wrapper: never trained, and exporters warn on training mode

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.model.prefill(input_ids)

    def example_inputs(self, length: int = 8) -> tuple[torch.Tensor, ...]:
        return (torch.zeros((1, length), dtype=torch.long),)

    def dynamic_shapes(self, max_length: int | None = None) -> tuple:
        # min=2: torch.export specialises sizes 0 and 1, so a dynamic dim must start at 2.
        dim = torch.export.Dim("sequence", min=2, max=max_length or _max_positions(self.model))
        return ({1: dim},)

    @property
    def input_names(self) -> list[str]:
        return ["input_ids"]

    @property
    def output_names(self) -> list[str]:
        return ["logits", *self.model.cache_names("present")]


class DecodeGraph(nn.Module):
    """``forward = decode`` with the past as flat positional tensors (k_0, v_0, k_1, ...).

    ``*past`` is one pytree node for torch.export: its dynamic shapes are a *tuple* of per-tensor
    specs inside the outer tuple, which ``dynamic_shapes()`` builds.
    """

    def __init__(self, model: CausalLMWithCache) -> None:
        super().__init__()
        self.model = model
        self.eval()  # an export wrapper: never trained, and exporters warn on training mode

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.model.decode(input_ids, *past)

    def example_inputs(self, past_length: int = 8) -> tuple[torch.Tensor, ...]:
        return (torch.zeros((1, 1), dtype=torch.long), *self.model.empty_cache(past_length))

    def dynamic_shapes(self, max_length: int | None = None) -> tuple:
        dim = torch.export.Dim("past", min=2, max=(max_length or _max_positions(self.model)) - 1)
        return (None, tuple({2: dim} for _ in range(2 * self.model.num_layers)))

    @property
    def input_names(self) -> list[str]:
        return ["input_ids", *self.model.cache_names("past")]

    @property
    def output_names(self) -> list[str]:
        return ["logits", *self.model.cache_names("present")]
