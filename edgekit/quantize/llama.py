"""MobileQuant's simulated LLaMA decoder: equivalent transforms, weight clipping, activation ranges.

:class:`QuantLlama` is a :class:`~edgekit.models.llama.CausalLMWithCache` over a *copy* of the
float model's submodules with three switches:

- ``folded=False``: weights and norm scales are computed on the fly from the float ones and the
  five learnable equivalent-transform scales of each block (norm→qkv, norm→gate/up, v→o, q↔k,
  up→down); ``folded=True`` after :meth:`fold` wrote them (and the clipping) into the modules.
- ``quant_weights`` / ``quant_acts``: weight fake-quant with learned clipping, and per-tensor
  activation fake-quant with learned scale/offset at every site of :data:`LAYER_SITES`.

With both switches off the model computes the float function (the transforms are exact
equivalences), which the tests hold to 1e-5. Every site's tensor is the *output of a named
module* (a projection, a norm, or one of the small op modules in ``ops``), so its learned range is
addressed by module path in :class:`~edgekit.quantize.spec.QuantSpec` overrides and finds the same
tensor in the prefill and the decode graph.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from edgekit.errors import EdgekitError
from edgekit.models.llama import MASK_VALUE, CausalLMWithCache, _rotate_half
from edgekit.quantize.fakequant import ActQuant, QuantSwitches, WeightQuant, symmetric_fake_quant
from edgekit.quantize.spec import FamilyPlan, TensorOverride

# site -> (kind, module path inside the model, with {i} the layer index). "matmul" sites feed a
# matrix multiplication (8-bit); "other" sites feed norms, softmax, residual adds, RoPE, SiLU or the
# graph output (16-bit in the paper's mixed precision, 8-bit in the int8-only variant).
LAYER_SITES: dict[str, tuple[str, str]] = {
    "attn_in": ("matmul", "layers.{i}.input_layernorm"),
    "q": ("other", "layers.{i}.self_attn.q_proj"),
    "k": ("other", "layers.{i}.self_attn.k_proj"),
    "v": ("matmul", "layers.{i}.self_attn.v_proj"),
    "q_rope": ("matmul", "ops.{i}.q_rope"),
    "k_rope": ("matmul", "ops.{i}.k_rope"),
    "scores": ("other", "ops.{i}.scores"),
    "masked": ("other", "ops.{i}.masked"),  # prefill only: decode attends to every past token
    "probs": ("other", "ops.{i}.softmax"),
    "attn_out": ("matmul", "ops.{i}.attn_out"),
    "o": ("other", "layers.{i}.self_attn.o_proj"),
    "res_attn": ("other", "ops.{i}.res_attn"),
    "mlp_in": ("matmul", "layers.{i}.post_attention_layernorm"),
    "gate": ("other", "layers.{i}.mlp.gate_proj"),
    "act": ("other", "layers.{i}.mlp.act_fn"),
    "up": ("other", "layers.{i}.mlp.up_proj"),
    "prod": ("matmul", "ops.{i}.prod"),
    "down": ("other", "layers.{i}.mlp.down_proj"),
    "res_mlp": ("other", "ops.{i}.res_mlp"),
}
HEAD_SITES: dict[str, tuple[str, str]] = {
    # The lookup reads the head's per-row weights (int8: one table stored once, shared by Gather
    # and head); its output is a learned site like any other, 16-bit into the first norm and add.
    "embed": ("other", "embed_tokens"),
    "final": ("matmul", "norm"),
    "logits": ("other", "lm_head"),
}
# Softmax-input range below the observed maximum: exp(-256) is 0 in float32 and the 16-bit step
# stays 1/256; at 8 bits a narrower span keeps the step at 1/8 (exp(-32) ~ 1e-14 leaks nothing).
SCORES_SPAN = {16: 256.0, 8: 32.0}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# -- op modules: each site that is not a projection or norm output gets its own module -----------
class Rope(nn.Module):
    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x * cos + _rotate_half(x) * sin


class Scores(nn.Module):
    """q·kᵀ alone: 1/√d is folded into q_proj and the causal mask is its own site. Inside one module
    the raw product is an intermediate tensor, which the QDQ graph quantized with an 8-bit MinMax
    range the simulation never saw."""

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return torch.matmul(q, k[:, :, None].transpose(-1, -2))


class Softmax(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x, dim=-1)


class AttnOut(nn.Module):
    def forward(self, probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.matmul(probs, v[:, :, None])  # [B, kv, g, S, d]


class Add(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class Mul(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * b


class LayerOps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_rope, self.k_rope = Rope(), Rope()
        self.scores = Scores()
        self.masked = Add()
        self.softmax = Softmax()
        self.attn_out = AttnOut()
        self.res_attn, self.res_mlp = Add(), Add()
        self.prod = Mul()


class LayerTransforms(nn.Module):
    """The five equivalent-transform scales of one block (all ones = identity)."""

    def __init__(self, hidden: int, kv_heads: int, head_dim: int, intermediate: int) -> None:
        super().__init__()
        self.attn = nn.Parameter(torch.ones(hidden))  # norm -> q/k/v: x / s, W * s
        self.mlp = nn.Parameter(torch.ones(hidden))  # norm -> gate/up
        self.vo = nn.Parameter(torch.ones(kv_heads, head_dim))  # v rows / s, o columns * s
        self.qk = nn.Parameter(torch.ones(kv_heads, head_dim // 2))  # q rows / s, k rows * s (RoPE pairs)
        self.ud = nn.Parameter(torch.ones(intermediate))  # up rows / s, down columns * s


@dataclass(frozen=True)
class Bits:
    """Bit-widths: weights, matmul-input activations, and every other activation site."""

    weight: int = 8
    matmul: int = 8
    other: int = 16
    per_channel: bool = False  # all weights per channel (W4A8); else per tensor ...
    per_channel_down: bool = True  # ... except down_proj (W8A8)
    norm_weight: int = 16  # RMSNorm weights: 16-bit as the paper, 8 where the target has no 16-bit

    def site(self, kind: str) -> int:
        return self.matmul if kind == "matmul" else self.other


def clamp_scale(s: torch.Tensor) -> torch.Tensor:
    """Keep a transform scale away from zero (the inverse would blow up) while keeping its sign."""
    return torch.where(s >= 0, s.clamp_min(1e-5), s.clamp_max(-1e-5))


# Op types inside norms, RoPE, SiLU and the mask whose outputs stay 16-bit in the mixed-precision
# recipes (the learned sites are fixed by overrides; these are the remaining non-linear pieces).
SIXTEEN_BIT_OPS = frozenset(
    {"Pow", "ReduceMean", "Add", "Sqrt", "Div", "Reciprocal", "Mul", "Neg", "Sigmoid", "Softmax", "Sub", "Cos", "Sin"}
)


class QuantLlama(CausalLMWithCache, QuantSwitches):
    """The simulated (fake-quant) and, after :meth:`fold`, the exportable float model."""

    family = "llama"
    # down_proj per channel as the paper's W8A8. The head is 8-bit per row under W4 too, as W4
    # methods keep the head wide: SmolLM2's weights at 4 bits, nothing learned, score 76.7 held-out
    # perplexity with a 4-bit head and 49.8 with an 8-bit one (fp32 22.7; bench/mobilequant_heldout.py).
    # The lookup table gets the same grid, so a tied model's lookup and head read one stored int8
    # table (the exporter writes a tensor and its transpose once).
    plan = FamilyPlan(
        per_channel=("*down_proj",),
        eight_bit=("lm_head", "embed_tokens"),
        sixteen_bit_ops=SIXTEEN_BIT_OPS,
        fuse_rms_norm=True,
    )

    def __init__(self, float_model: CausalLMWithCache, bits: Bits = Bits(), clip_init: float = 4.0) -> None:
        model = copy.deepcopy(float_model)
        base = SimpleNamespace(embed_tokens=model.embed_tokens, layers=model.layers, norm=model.norm)
        super().__init__(SimpleNamespace(config=model.config, model=base, lm_head=model.lm_head))
        # Untie: lookup and head export as two initializers, each quantized on its own axis (equal int8
        # values, which the exporter stores once).
        if self.lm_head.weight is self.embed_tokens.weight:
            self.lm_head.weight = nn.Parameter(self.embed_tokens.weight.detach().clone())
        for layer in self.layers:
            for name in LINEARS:
                if _linear(layer, name).bias is not None:
                    raise EdgekitError(f"MobileQuant's LLaMA path expects bias-free projections ({name} has one)")
        self.bits = bits
        config = self.config
        hidden = int(config.hidden_size)
        intermediate = int(config.intermediate_size)
        with torch.no_grad():  # attention's 1/√d into q_proj (RoPE is linear; exact for d = 64)
            for layer in self.layers:
                layer.self_attn.q_proj.weight.mul_(self.scaling)
        self.ops = nn.ModuleList(LayerOps() for _ in self.layers)
        self.transforms = nn.ModuleList(
            LayerTransforms(hidden, self.num_kv_heads, self.head_dim, intermediate) for _ in self.layers
        )
        self.acts = nn.ModuleList(
            nn.ModuleDict({site: ActQuant(bits.site(kind)) for site, (kind, _) in LAYER_SITES.items()})
            for _ in self.layers
        )
        self.head_acts = nn.ModuleDict({site: ActQuant(bits.site(kind)) for site, (kind, _) in HEAD_SITES.items()})
        self.wquant = nn.ModuleList()
        for layer in self.layers:
            quants = {}
            for name in LINEARS:
                per_channel = bits.per_channel or (bits.per_channel_down and self.plan.is_per_channel(name))
                quants[name] = WeightQuant(_linear(layer, name).out_features, bits.weight, per_channel, clip_init)
            self.wquant.append(nn.ModuleDict(quants))
        # The head is not reached by the hidden-state loss: MinMax, no clipping to learn.
        self.head_wquant = WeightQuant(
            self.lm_head.out_features,
            self.plan.weight_bits("lm_head", bits.weight),
            self.plan.is_per_channel("lm_head"),
            learn=False,
        )
        self.recorder: dict[str, torch.Tensor] | None = None
        self.switch_off()

    # -- switches -------------------------------------------------------------------------------
    def weight_quants(self) -> list[WeightQuant]:
        return [q for quants in self.wquant for q in quants.values()] + [self.head_wquant]

    @torch.no_grad()
    def init_ranges(self) -> None:
        """MinMax init from what :meth:`observe` saw."""
        for quant in self.act_quants():
            quant.init_from_observed()
        for sites in self.acts:
            # The masked scores (MASK_VALUE) would stretch the softmax input's grid over 1e4; softmax
            # is shift-invariant, so scores far below the maximum only need to stay far below it.
            masked = sites["masked"]
            span = SCORES_SPAN[masked.bits]
            masked.set_range(max(float(masked.low), float(masked.high) - span), float(masked.high))

    # -- effective (transformed) weights ----------------------------------------------------------
    def _expand_heads(self, per_kv: torch.Tensor) -> torch.Tensor:
        """[kv, d] -> [heads * d] in q/o channel order (head = kv * groups + g)."""
        return per_kv[:, None, :].expand(self.num_kv_heads, self.groups, self.head_dim).reshape(-1)

    def effective(self, index: int) -> dict[str, torch.Tensor]:
        """Block ``index``'s norm weights and projection weights with its transforms applied."""
        layer, t = self.layers[index], self.transforms[index]
        attn, mlp = layer.self_attn, layer.mlp
        s_attn, s_mlp, s_ud = clamp_scale(t.attn), clamp_scale(t.mlp), clamp_scale(t.ud)
        s_vo = clamp_scale(t.vo)
        s_qk = clamp_scale(t.qk)
        s_qk = torch.cat((s_qk, s_qk), dim=-1)  # RoPE rotates channel j with j + d/2: equal scales commute
        return {
            "input_layernorm": layer.input_layernorm.weight / s_attn,
            "q_proj": attn.q_proj.weight * s_attn[None, :] / self._expand_heads(s_qk)[:, None],
            "k_proj": attn.k_proj.weight * s_attn[None, :] * s_qk.reshape(-1)[:, None],
            "v_proj": attn.v_proj.weight * s_attn[None, :] / s_vo.reshape(-1)[:, None],
            "o_proj": attn.o_proj.weight * self._expand_heads(s_vo)[None, :],
            "post_attention_layernorm": layer.post_attention_layernorm.weight / s_mlp,
            "gate_proj": mlp.gate_proj.weight * s_mlp[None, :],
            "up_proj": mlp.up_proj.weight * s_mlp[None, :] / s_ud[:, None],
            "down_proj": mlp.down_proj.weight * s_ud[None, :],
        }

    @torch.no_grad()
    def fold(self) -> QuantLlama:
        """Write transforms and learned clipping into the weights; the model becomes plain float.

        The result (with quantization off) is the graph to export: its projection weights are the
        clipped transformed ones, its norm weights absorb the smoothing, its transforms are ones.
        """
        if self.folded:
            return self
        for index, layer in enumerate(self.layers):
            weights = self.effective(index)
            for name in ("input_layernorm", "post_attention_layernorm"):
                getattr(layer, name).weight.copy_(weights[name])
            for name in LINEARS:
                _linear(layer, name).weight.copy_(self.wquant[index][name].clip(weights[name]))
            for parameter in self.transforms[index].parameters():
                parameter.fill_(1.0)
        self.mark_folded()
        return self

    # -- forward ------------------------------------------------------------------------------------
    def _record(self, key: str, x: torch.Tensor, dims: tuple[int, ...]) -> None:
        if self.recorder is not None:
            value = x.detach().abs().amax(dim=dims)
            old = self.recorder.get(key)
            self.recorder[key] = value if old is None else torch.maximum(old, value)

    def _project(self, index: int, name: str, x: torch.Tensor, weights: dict[str, torch.Tensor] | None):
        module = _linear(self.layers[index], name)
        if weights is None:
            return module(x)
        return F.linear(x, self.wquant[index][name](weights[name]))

    def _norm(self, module: nn.Module, x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """RMSNorm as the exported graph runs it: one op, its weight quantized per tensor."""
        if weight is None and not self.quant_norm_weights:
            return module(x)  # the folded model: traced inside the norm module's scope
        weight = module.weight if weight is None else weight
        if self.quant_norm_weights:
            weight = symmetric_fake_quant(weight, self.bits.norm_weight)
        variance = x.pow(2).mean(-1, keepdim=True)
        return weight * (x * torch.rsqrt(variance + module.variance_epsilon))

    def _block(
        self,
        index: int,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        past_k: torch.Tensor | None,
        past_v: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        layer, ops, act = self.layers[index], self.ops[index], self.acts[index]
        weights = None if self.folded else self.effective(index)
        batch, length = hidden.shape[0], hidden.shape[1]
        kv, groups, dim = self.num_kv_heads, self.groups, self.head_dim

        x = act["attn_in"](self._norm(layer.input_layernorm, hidden, weights and weights["input_layernorm"]))
        self._record(f"{index}.attn_in", x, (0, 1))
        q = act["q"](self._project(index, "q_proj", x, weights))
        k = act["k"](self._project(index, "k_proj", x, weights))
        v = act["v"](self._project(index, "v_proj", x, weights))
        # RoPE runs in the projections' [B, S, heads, d] layout and the head transposes come after
        # the rope modules: a site module must end at its compute op, not at a data move (a
        # Transpose/Reshape takes its input's quantization in the QDQ graph, not the override).
        cos_s, sin_s = cos.reshape(1, length, 1, dim), sin.reshape(1, length, 1, dim)
        q = act["q_rope"](ops.q_rope(q.view(batch, length, kv, groups, dim), cos_s[:, :, None], sin_s[:, :, None]))
        k = act["k_rope"](ops.k_rope(k.view(batch, length, kv, dim), cos_s, sin_s))
        self._record(f"{index}.q_rope", q, (0, 1, 3))  # [kv, d]
        self._record(f"{index}.k_rope", k, (0, 1))  # [kv, d]
        q = q.permute(0, 2, 3, 1, 4)  # [B, kv, g, S, d]
        k = k.transpose(1, 2)  # [B, kv, S, d]
        v = v.view(batch, length, kv, dim).transpose(1, 2)
        if past_k is not None:
            k = torch.cat((past_k, k), dim=2)
            v = torch.cat((past_v, v), dim=2)
        scores = act["scores"](ops.scores(q, k))
        if mask is not None:
            scores = act["masked"](ops.masked(scores, mask))
        probs = act["probs"](ops.softmax(scores))
        out = act["attn_out"](ops.attn_out(probs, v)).permute(0, 3, 1, 2, 4).reshape(batch, length, -1)
        self._record(f"{index}.attn_out", out, (0, 1))
        hidden = act["res_attn"](ops.res_attn(hidden, act["o"](self._project(index, "o_proj", out, weights))))

        mlp = layer.mlp
        x = act["mlp_in"](
            self._norm(layer.post_attention_layernorm, hidden, weights and weights["post_attention_layernorm"])
        )
        self._record(f"{index}.mlp_in", x, (0, 1))
        gate = act["act"](mlp.act_fn(act["gate"](self._project(index, "gate_proj", x, weights))))
        up = act["up"](self._project(index, "up_proj", x, weights))
        product = act["prod"](ops.prod(gate, up))
        self._record(f"{index}.prod", product, (0, 1))
        down = act["down"](self._project(index, "down_proj", product, weights))
        hidden = act["res_mlp"](ops.res_mlp(hidden, down))
        return hidden, k, v

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.head_wquant.enabled:
            rows = F.embedding(input_ids, self.head_wquant(self.embed_tokens.weight))
        else:
            rows = self.embed_tokens(input_ids)
        return self.head_acts["embed"](rows)

    def hidden_state(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The final (normed) hidden state of a prefill: MobileQuant's training target."""
        return self._body(input_ids)[0]

    def _body(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        length = input_ids.shape[1]
        hidden = self._embed(input_ids)
        cos, sin = self._rope(0, length)
        positions = torch.arange(length, device=input_ids.device)
        future = positions[None, :] > positions[:, None]
        mask = (future.to(hidden.dtype) * MASK_VALUE)[None, None]
        cache: list[torch.Tensor] = []
        for index in range(self.num_layers):
            hidden, k, v = self._block(index, hidden, cos, sin, mask, None, None)
            cache += [k, v]
        return self.head_acts["final"](self._norm(self.norm, hidden, None)), cache

    def _logits(self, normed: torch.Tensor) -> torch.Tensor:
        if self.head_wquant.enabled:
            logits = F.linear(normed, self.head_wquant(self.lm_head.weight))
        else:
            logits = self.lm_head(normed)
        return self.head_acts["logits"](logits)

    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        normed, cache = self._body(input_ids)
        return (self._logits(normed), *cache)

    def decode(self, input_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(past) != 2 * self.num_layers:
            raise ValueError(f"decode needs {2 * self.num_layers} past tensors, got {len(past)}")
        hidden = self._embed(input_ids)
        cos, sin = self._rope(past[0].shape[2], input_ids.shape[1])
        cache: list[torch.Tensor] = []
        for index in range(self.num_layers):
            hidden, k, v = self._block(index, hidden, cos, sin, None, past[2 * index], past[2 * index + 1])
            cache += [k, v]
        return (self._logits(self.head_acts["final"](self._norm(self.norm, hidden, None))), *cache)

    # -- export plan ----------------------------------------------------------------------------------
    def overrides(self) -> dict[str, TensorOverride]:
        """Module path -> the learned quantization of that module's output tensor."""
        table: dict[str, TensorOverride] = {}
        for index, sites in enumerate(self.acts):
            for site, (_, path) in LAYER_SITES.items():
                table[path.format(i=index)] = sites[site].override()
        for site, (_, path) in HEAD_SITES.items():
            table[path] = self.head_acts[site].override()
        return table


def _linear(layer: nn.Module, name: str) -> nn.Linear:
    return getattr(layer.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp, name)
