"""MobileQuant's simulated transformer encoders: BERT-style (post-norm) and DINOv2-style (pre-norm).

:class:`QuantEncoder` rebuilds a Hugging Face ``BertModel`` (inside a
:class:`~edgekit.models.hf.SentenceEncoder`) or ``Dinov2Model`` (inside a
:class:`~edgekit.models.hf.VisionEncoder`) from plain named modules, with the same switches as
:class:`~edgekit.quantize.llama.QuantLlama`: ``folded``, weight fake-quant with learned clipping and
per-tensor activation fake-quant with a learned scale/offset at every site. Its ``forward`` takes and
returns what the wrapped model did, so it exports in its place; every site is a named module's
output (or the graph input), which is how the exporter finds the learned ranges.

Equivalent transforms are used only where they are equivalences:

- pre-norm (DINOv2): norm1→q/k/v, norm2→fc1, v→o, q↔k. LayerScale is folded into o and fc2 at
  construction (exact), so the residual adds read the projections directly.
- post-norm (BERT): v→o and q↔k. A post-norm's output is also the residual stream, so scaling it for
  the next projections would change the residual; and GELU sits between fc1 and fc2 in both, so
  the LLaMA up→down transform has no counterpart.

Bit-widths as the paper's rule: 8-bit into matmuls, 16-bit at norm, softmax, residual, GELU and
output sites. In a post-norm block one tensor is both a norm output (the residual) and the q/k/v
input; it is 16-bit (a per-tensor 8-bit residual rounds MiniLM's ordinary channels to a few steps:
its outlier channels are ~100x the rest), so q/k/v read 16-bit activations there (W8A16 matmuls).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from edgekit.errors import EdgekitError
from edgekit.models.hf import additive_padding_mask
from edgekit.quantize.fakequant import ActQuant, QuantSwitches, WeightQuant, symmetric_fake_quant
from edgekit.quantize.llama import SCORES_SPAN, SIXTEEN_BIT_OPS, Add, Bits, Softmax, clamp_scale
from edgekit.quantize.spec import FamilyPlan, TensorOverride

LINEARS = ("q", "k", "v", "o", "fc1", "fc2")


def layer_sites(pre_norm: bool) -> dict[str, tuple[str, str]]:
    """site -> (kind, module path with {i}); "matmul" sites are 8-bit, "other" 16-bit (see above)."""
    norm_kind = "matmul" if pre_norm else "other"
    sites = {
        "q": ("matmul", "layers.{i}.q"),
        "k": ("matmul", "layers.{i}.k"),
        "v": ("matmul", "layers.{i}.v"),
        "scores": ("other", "ops.{i}.scores"),
        "masked": ("other", "ops.{i}.masked"),
        "probs": ("other", "ops.{i}.softmax"),
        "attn_out": ("matmul", "ops.{i}.attn_out"),
        "o": ("other", "layers.{i}.o"),
        "res_attn": ("other", "ops.{i}.res_attn"),
        "norm2": (norm_kind, "layers.{i}.norm2"),
        "fc1": ("other", "layers.{i}.fc1"),
        "act": ("matmul", "layers.{i}.act"),
        "fc2": ("other", "layers.{i}.fc2"),
        "res_mlp": ("other", "ops.{i}.res_mlp"),
    }
    if pre_norm:  # no padding: nothing to mask
        del sites["masked"]
    # pre-norm: norm1 opens the block (8-bit into q/k/v); post-norm: norm1 closes the attention half
    # (after res_attn) and norm2 closes the block, both 16-bit residual streams.
    sites["norm1"] = ("matmul", "layers.{i}.norm1") if pre_norm else ("other", "layers.{i}.norm1")
    return sites


def head_sites(pre_norm: bool, pooled: bool, normalize: bool) -> dict[str, tuple[str, str]]:
    """The embedding and output sites (module path, or a graph input's name)."""
    if pre_norm:
        sites = {
            "pixels": ("matmul", "pixel_values"),
            "patches": ("other", "embed.patches"),
            "tokens": ("other", "embed.add"),
            "final": ("other", "norm"),
        }
    else:
        sites = {
            "word": ("other", "embed.word"),
            "positions": ("other", "embed.positions"),
            "sum": ("other", "embed.add"),
            "embed_norm": ("other", "embed.norm"),
        }
    if pooled:
        sites["pooled"] = ("other", "pool")
        if normalize:
            sites["embedding"] = ("other", "normalize")
    return sites


# -- modules: every site is one of these modules' outputs -----------------------------------------
class Scores(nn.Module):
    """q·kᵀ alone: the 1/√d scaling is folded into q, and the padding mask is its own site (an
    intermediate tensor inside a site module would get a range nobody learned)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return torch.matmul(q, k.transpose(-1, -2))


class AttnOut(nn.Module):
    def forward(self, probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.matmul(probs, v)


class LayerOps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scores = Scores()
        self.masked = Add()
        self.softmax = Softmax()
        self.attn_out = AttnOut()
        self.res_attn, self.res_mlp = Add(), Add()


class Block(nn.Module):
    """One encoder layer's float weights under plain names (the HF layout differs per family)."""

    def __init__(self, hidden: int, intermediate: int, eps: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(hidden, eps=eps), nn.LayerNorm(hidden, eps=eps)
        self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(hidden, intermediate), nn.Linear(intermediate, hidden)
        self.act = nn.GELU()


class Positions(nn.Module):
    """The first ``length`` rows of a learned position table (plus BERT's token-type-0 row).

    A lookup (Gather), not a slice: a slice bounds the exported sequence axis by the table's
    length (torch.export refuses the dynamic axis). Its indices come from the input's shape, so
    the exporter leaves it float: once a deployment fixes the length it folds to a constant, and
    only its output (the ``positions`` site) is quantized.
    """

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(table.detach().clone())

    def forward(self, like: torch.Tensor) -> torch.Tensor:
        return F.embedding(torch.arange(like.shape[1], device=like.device)[None], self.weight)


class TextEmbeddings(nn.Module):
    def __init__(self, embeddings: nn.Module) -> None:
        super().__init__()
        self.word = copy.deepcopy(embeddings.word_embeddings)
        table = embeddings.position_embeddings.weight + embeddings.token_type_embeddings.weight[0]
        self.positions = Positions(table)
        self.add = Add()
        self.norm = copy.deepcopy(embeddings.LayerNorm)


class Patches(nn.Module):
    """The patch convolution; its output (before the token reshape) is the ``patches`` site."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = copy.deepcopy(conv)

    def forward(self, pixels: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        if weight is None:
            return self.conv(pixels)
        return F.conv2d(pixels, weight, self.conv.bias, self.conv.stride)


class Tokens(nn.Module):
    """[CLS] + patch tokens + positions: the residual stream's first value.

    The patch tokens get a zero row in front (a Pad, which keeps their quantization) and one
    constant table adds [CLS]+position 0 to it and the positions to the rest: no Concat with a
    constant, which the QDQ graph would quantize with a range nobody learned. The table is a
    constant operand of a 16-bit add, which the exporter stores at 16 bits (symmetric).
    """

    def __init__(self, embeddings: nn.Module) -> None:
        super().__init__()
        self.patches = Patches(embeddings.patch_embeddings.projection)
        table = embeddings.position_embeddings.detach().clone()
        table[0, 0] += embeddings.cls_token[0, 0].detach()
        self.positions = nn.Parameter(table)
        self.add = Add()

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return F.pad(patches.flatten(2).transpose(1, 2), (0, 0, 1, 0))


class MeanPool(nn.Module):
    def forward(self, hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        weights = keep.unsqueeze(-1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


class ClsPool(nn.Module):
    def forward(self, hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return hidden[:, 0] * 1.0  # a compute op, so the pooled site is a module output


class Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, p=2.0, dim=-1)


class LayerTransforms(nn.Module):
    """The block's equivalent-transform scales (all ones = identity); pre-norm has four, post-norm two."""

    def __init__(self, hidden: int, pre_norm: bool) -> None:
        super().__init__()
        self.vo = nn.Parameter(torch.ones(hidden))  # v rows / s, o columns * s
        self.qk = nn.Parameter(torch.ones(hidden))  # q rows / s, k rows * s
        if pre_norm:
            self.attn = nn.Parameter(torch.ones(hidden))  # norm1 / s, q/k/v columns * s
            self.mlp = nn.Parameter(torch.ones(hidden))  # norm2 / s, fc1 columns * s


# -- building from Hugging Face models ----------------------------------------------------------
def _bert_block(layer: nn.Module, config) -> Block:
    block = Block(config.hidden_size, config.intermediate_size, config.layer_norm_eps)
    attention = layer.attention
    pairs = {
        "q": attention.self.query,
        "k": attention.self.key,
        "v": attention.self.value,
        "o": attention.output.dense,
        "norm1": attention.output.LayerNorm,
        "fc1": layer.intermediate.dense,
        "fc2": layer.output.dense,
        "norm2": layer.output.LayerNorm,
    }
    for name, source in pairs.items():
        getattr(block, name).load_state_dict(source.state_dict())
    return block


def _dinov2_block(layer: nn.Module, config) -> Block:
    block = Block(config.hidden_size, layer.mlp.fc1.out_features, config.layer_norm_eps)
    attention = layer.attention
    pairs = {
        "norm1": layer.norm1,
        "q": attention.q_proj,
        "k": attention.k_proj,
        "v": attention.v_proj,
        "o": attention.o_proj,
        "norm2": layer.norm2,
        "fc1": layer.mlp.fc1,
        "fc2": layer.mlp.fc2,
    }
    for name, source in pairs.items():
        getattr(block, name).load_state_dict(source.state_dict())
    with torch.no_grad():  # LayerScale into the projection that feeds the residual add (exact)
        for name, scale in (("o", layer.layer_scale1.lambda1), ("fc2", layer.layer_scale2.lambda1)):
            linear = getattr(block, name)
            linear.weight.mul_(scale[:, None])
            linear.bias.mul_(scale)
    return block


def _check_gelu(config) -> None:
    act = getattr(config, "hidden_act", "gelu")
    if act != "gelu":
        raise EdgekitError(f"MobileQuant's encoder path supports exact GELU MLPs, not '{act}'")


# The encoders' non-linear pieces besides the decoder's: LayerNorm, GELU (one op or its Erf form),
# pooling and L2 normalisation.
ENCODER_SIXTEEN_BIT_OPS = SIXTEEN_BIT_OPS | {
    "LayerNormalization",
    "Gelu",
    "Erf",
    "ReduceSum",
    "ReduceL2",
    "Max",
    "Clip",
}


class QuantEncoder(nn.Module, QuantSwitches):
    """The simulated (fake-quant) encoder and, after :meth:`fold`, the exportable float one."""

    # fc2 per channel as a decoder's down_proj. BERT's word table: per-row int8 (as the exporter
    # stores a Gather's table), nothing learned; DINOv2's patch convolution: per channel with learned
    # clipping, like any other layer.
    plan = FamilyPlan(
        per_channel=("*fc2", "embed.patches.conv"),
        eight_bit=("embed.word",),
        sixteen_bit_ops=ENCODER_SIXTEEN_BIT_OPS,
    )

    def __init__(self, float_module: nn.Module, bits: Bits = Bits(), clip_init: float = 4.0) -> None:
        super().__init__()
        self.family = encoder_family(float_module)  # "bert" or "dinov2": picks the learning rate
        if self.family == "bert":
            inner = float_module.encoder
            self.pre_norm, config = False, inner.config
            _check_gelu(config)
            self.embed = TextEmbeddings(inner.embeddings)
            self.layers = nn.ModuleList(_bert_block(layer, config) for layer in inner.encoder.layer)
            self.pool = MeanPool() if float_module.pooling == "mean" else ClsPool()
            self.normalize = Normalize() if float_module.normalize else None
        else:
            model = float_module.model
            self.pre_norm, config = True, model.config
            _check_gelu(config)
            if getattr(config, "use_swiglu_ffn", False):
                raise EdgekitError("MobileQuant's encoder path supports GELU MLPs, not SwiGLU")
            self.embed = Tokens(model.embeddings)
            self.layers = nn.ModuleList(_dinov2_block(layer, config) for layer in model.encoder.layer)
            self.norm = copy.deepcopy(model.layernorm)
            self.pool, self.normalize = None, None
        hidden = int(config.hidden_size)
        self.heads = int(config.num_attention_heads)
        self.head_dim = hidden // self.heads
        self.bits = bits
        self.sites = layer_sites(self.pre_norm)
        self.head_site_paths = head_sites(self.pre_norm, self.pool is not None, self.normalize is not None)
        with torch.no_grad():  # attention's 1/√d into q (exact for d = 64; rounding otherwise)
            for block in self.layers:
                block.q.weight.mul_(1.0 / math.sqrt(self.head_dim))
                block.q.bias.mul_(1.0 / math.sqrt(self.head_dim))
        self.ops = nn.ModuleList(LayerOps() for _ in self.layers)
        self.transforms = nn.ModuleList(LayerTransforms(hidden, self.pre_norm) for _ in self.layers)
        self.acts = nn.ModuleList(
            nn.ModuleDict({site: ActQuant(bits.site(kind)) for site, (kind, _) in self.sites.items()})
            for _ in self.layers
        )
        self.head_acts = nn.ModuleDict(
            {site: ActQuant(bits.site(kind)) for site, (kind, _) in self.head_site_paths.items()}
        )
        self.wquant = nn.ModuleList(
            nn.ModuleDict(
                {
                    name: WeightQuant(
                        getattr(block, name).out_features,
                        bits.weight,
                        bits.per_channel or (bits.per_channel_down and self.plan.is_per_channel(name)),
                        clip_init,
                    )
                    for name in LINEARS
                }
            )
            for block in self.layers
        )
        if self.pre_norm:
            embed, rows = "embed.patches.conv", self.embed.patches.conv.out_channels
        else:
            embed, rows = "embed.word", self.embed.word.num_embeddings
        self.embed_wquant = WeightQuant(
            rows,
            self.plan.weight_bits(embed, bits.weight),
            self.plan.is_per_channel(embed),
            clip_init,
            learn=self.pre_norm,
        )
        self.recorder: dict[str, torch.Tensor] | None = None
        self.switch_off()

    # -- switches: QuantSwitches, over these quantizers ------------------------------------------
    def weight_quants(self) -> list[WeightQuant]:
        return [q for quants in self.wquant for q in quants.values()] + [self.embed_wquant]

    @torch.no_grad()
    def init_ranges(self) -> None:
        for quant in self.act_quants():
            quant.init_from_observed()
        for sites in self.acts:
            # Calibration texts are unpadded, so the masked scores' observed minimum is a real score;
            # padding (-1e4) must still land far below the maximum: the range reaches span below it.
            if "masked" in sites:
                masked = sites["masked"]
                masked.set_range(float(masked.high) - SCORES_SPAN[masked.bits], float(masked.high))

    # -- effective (transformed) weights ------------------------------------------------------------
    def effective(self, index: int) -> dict[str, torch.Tensor]:
        """Block ``index``'s weights, biases and norm parameters with its transforms applied."""
        block, t = self.layers[index], self.transforms[index]
        s_vo, s_qk = clamp_scale(t.vo), clamp_scale(t.qk)
        w = {name: getattr(block, name).weight for name in LINEARS}
        b = {f"{name}.bias": getattr(block, name).bias for name in LINEARS}
        out = {**w, **b}
        for norm in ("norm1", "norm2"):
            out[f"{norm}.weight"] = getattr(block, norm).weight
            out[f"{norm}.bias"] = getattr(block, norm).bias
        if self.pre_norm:
            s_attn, s_mlp = clamp_scale(t.attn), clamp_scale(t.mlp)
            out["norm1.weight"], out["norm1.bias"] = out["norm1.weight"] / s_attn, out["norm1.bias"] / s_attn
            out["norm2.weight"], out["norm2.bias"] = out["norm2.weight"] / s_mlp, out["norm2.bias"] / s_mlp
            for name in ("q", "k", "v"):
                out[name] = out[name] * s_attn[None, :]
            out["fc1"] = out["fc1"] * s_mlp[None, :]
        out["q"], out["q.bias"] = out["q"] / s_qk[:, None], out["q.bias"] / s_qk
        out["k"], out["k.bias"] = out["k"] * s_qk[:, None], out["k.bias"] * s_qk
        out["v"], out["v.bias"] = out["v"] / s_vo[:, None], out["v.bias"] / s_vo
        out["o"] = out["o"] * s_vo[None, :]
        return out

    @torch.no_grad()
    def fold(self) -> QuantEncoder:
        """Write transforms and learned clipping into the modules; the model becomes plain float."""
        if self.folded:
            return self
        for index, block in enumerate(self.layers):
            values = self.effective(index)
            for name in LINEARS:
                linear = getattr(block, name)
                linear.weight.copy_(self.wquant[index][name].clip(values[name]))
                linear.bias.copy_(values[f"{name}.bias"])
            for norm in ("norm1", "norm2"):
                getattr(block, norm).weight.copy_(values[f"{norm}.weight"])
                getattr(block, norm).bias.copy_(values[f"{norm}.bias"])
            for parameter in self.transforms[index].parameters():
                parameter.fill_(1.0)
        if self.pre_norm:
            conv = self.embed.patches.conv
            conv.weight.copy_(self.embed_wquant.clip(conv.weight.flatten(1)).view_as(conv.weight))
        self.mark_folded()
        return self

    # -- forward ----------------------------------------------------------------------------------
    def _record(self, key: str, x: torch.Tensor) -> None:
        if self.recorder is not None:
            value = x.detach().abs().flatten(0, -2).amax(dim=0)
            old = self.recorder.get(key)
            self.recorder[key] = value if old is None else torch.maximum(old, value)

    def _linear(self, index: int, name: str, x: torch.Tensor, values: dict[str, torch.Tensor] | None):
        """A projection on the tokens flattened to 2-D: it exports as one Gemm whose bias the QDQ
        quantizer stores as int32 at the input×weight scale (3-D exports as MatMul + Add, which
        quantizes the product to 8 bits before the bias and the bias itself to int8)."""
        module = getattr(self.layers[index], name)
        flat = x.reshape(-1, x.shape[-1])
        if values is None:
            out = module(flat)
        else:
            out = F.linear(flat, self.wquant[index][name](values[name]), values[f"{name}.bias"])
        return out.view(*x.shape[:-1], out.shape[-1])

    def _block_norm(self, index: int, name: str, x: torch.Tensor, values: dict[str, torch.Tensor] | None):
        module = getattr(self.layers[index], name)
        if values is None:
            return self._norm(module, x)
        return self._norm(module, x, values[f"{name}.weight"], values[f"{name}.bias"])

    def _norm(
        self,
        module: nn.LayerNorm,
        x: torch.Tensor,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """LayerNorm as the exported graph runs it: one op, its weight quantized per tensor; the
        module's own parameters unless transformed ones are given."""
        if weight is None and not self.quant_norm_weights:
            return module(x)  # the folded model: traced inside the norm module's scope
        weight = module.weight if weight is None else weight
        bias = module.bias if bias is None else bias
        if self.quant_norm_weights:
            weight = symmetric_fake_quant(weight, self.bits.norm_weight)
        return F.layer_norm(x, module.normalized_shape, weight, bias, module.eps)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def _attention(self, index: int, x: torch.Tensor, mask, values) -> torch.Tensor:
        ops, act = self.ops[index], self.acts[index]
        q = act["q"](self._linear(index, "q", x, values))
        k = act["k"](self._linear(index, "k", x, values))
        v = act["v"](self._linear(index, "v", x, values))
        self._record(f"{index}.q", q)
        self._record(f"{index}.k", k)
        scores = act["scores"](ops.scores(self._heads(q), self._heads(k)))
        if mask is not None:
            scores = act["masked"](ops.masked(scores, mask))
        probs = act["probs"](ops.softmax(scores))
        out = act["attn_out"](ops.attn_out(probs, self._heads(v)))
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        self._record(f"{index}.attn_out", out)
        return act["o"](self._linear(index, "o", out, values))

    def _mlp(self, index: int, x: torch.Tensor, values) -> torch.Tensor:
        act = self.acts[index]
        hidden = act["fc1"](self._linear(index, "fc1", x, values))
        hidden = act["act"](self.layers[index].act(hidden))
        return act["fc2"](self._linear(index, "fc2", hidden, values))

    def _block(self, index: int, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        ops, act = self.ops[index], self.acts[index]
        values = None if self.folded else self.effective(index)
        if self.pre_norm:
            x = act["norm1"](self._block_norm(index, "norm1", hidden, values))
            self._record(f"{index}.attn_in", x)
            hidden = act["res_attn"](ops.res_attn(hidden, self._attention(index, x, mask, values)))
            x = act["norm2"](self._block_norm(index, "norm2", hidden, values))
            self._record(f"{index}.mlp_in", x)
            return act["res_mlp"](ops.res_mlp(hidden, self._mlp(index, x, values)))
        hidden = act["res_attn"](ops.res_attn(hidden, self._attention(index, hidden, mask, values)))
        hidden = act["norm1"](self._block_norm(index, "norm1", hidden, values))
        hidden = act["res_mlp"](ops.res_mlp(hidden, self._mlp(index, hidden, values)))
        return act["norm2"](self._block_norm(index, "norm2", hidden, values))

    def _embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        acts, embed = self.head_acts, self.embed
        if self.embed_wquant.enabled:
            words = F.embedding(input_ids, self.embed_wquant(embed.word.weight))
        else:
            words = embed.word(input_ids)
        words, positions = acts["word"](words), acts["positions"](embed.positions(input_ids))
        summed = acts["sum"](embed.add(words, positions))
        return acts["embed_norm"](self._norm(embed.norm, summed))

    def _embed_image(self, pixels: torch.Tensor) -> torch.Tensor:
        acts, embed = self.head_acts, self.embed
        conv = embed.patches.conv
        weight = None
        if self.embed_wquant.enabled:
            weight = self.embed_wquant(conv.weight.flatten(1)).view_as(conv.weight)
        patches = embed(acts["patches"](embed.patches(acts["pixels"](pixels), weight)))
        # A constant operand of a 16-bit add: the QDQ exporter stores it at 16 bits. (The int8-only
        # plan's ONNX file stores it at int8 and its .pte keeps it float; 16 bits stays near both.)
        positions = embed.positions
        if self.quant_norm_weights:
            positions = symmetric_fake_quant(positions, 16)
        return acts["tokens"](embed.add(patches, positions))

    def hidden_state(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The last hidden state (after the final norm): MobileQuant's training target."""
        if self.pre_norm:
            hidden = self._embed_image(batch["pixel_values"])
            for index in range(len(self.layers)):
                hidden = self._block(index, hidden, None)
            return self.head_acts["final"](self._norm(self.norm, hidden))
        mask = additive_padding_mask(batch["attention_mask"])
        hidden = self._embed_text(batch["input_ids"])
        for index in range(len(self.layers)):
            hidden = self._block(index, hidden, mask)
        return hidden

    def outputs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """What the wrapped model returned: the last hidden state, or the pooled sentence embedding."""
        hidden = self.hidden_state(batch)
        if self.pool is None:
            return hidden
        pooled = self.head_acts["pooled"](self.pool(hidden, batch["attention_mask"].to(torch.float32)))
        if self.normalize is None:
            return pooled
        return self.head_acts["embedding"](self.normalize(pooled))

    # -- export plan --------------------------------------------------------------------------------
    def overrides(self) -> dict[str, TensorOverride]:
        """Module path (or graph input name) -> the learned quantization of that tensor."""
        table: dict[str, TensorOverride] = {}
        for index, sites in enumerate(self.acts):
            for site, (_, path) in self.sites.items():
                table[path.format(i=index)] = sites[site].override()
        for site, (_, path) in self.head_site_paths.items():
            table[path] = self.head_acts[site].override()
        return table


class QuantTextEncoder(QuantEncoder):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.outputs({"input_ids": input_ids, "attention_mask": attention_mask})


class QuantVisionEncoder(QuantEncoder):
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.outputs({"pixel_values": pixel_values})


def encoder_family(float_module: nn.Module) -> str:
    """ "bert" (a SentenceEncoder over BERT) or "dinov2" (a VisionEncoder over DINOv2); else a clear error."""
    inner = getattr(float_module, "encoder", None) if hasattr(float_module, "pooling") else None
    if inner is not None and getattr(inner.config, "model_type", "") == "bert":
        return "bert"
    model = getattr(float_module, "model", None)
    if getattr(getattr(model, "config", None), "model_type", "") == "dinov2":
        return "dinov2"
    raise EdgekitError(
        "MobileQuant supports LLaMA-family causal LMs, BERT sentence encoders, DINOv2 vision encoders and "
        f"plain conv/linear nets; got a {type(float_module).__name__}"
    )


def quant_encoder(float_module: nn.Module, bits: Bits = Bits(), clip_init: float = 4.0) -> QuantEncoder:
    """The simulated encoder, taking the same inputs (by name) as ``float_module``."""
    kind = QuantTextEncoder if encoder_family(float_module) == "bert" else QuantVisionEncoder
    return kind(float_module, bits, clip_init)
