"""A local Hugging Face model directory → :class:`ModelBundle`.

Three families, each wrapped so ``module(**example_inputs)`` returns one export-friendly tensor:

- LLaMA-family causal LMs → :class:`~edgekit.models.llama.CausalLMWithCache` (logits);
- BERT-like encoders → :class:`SentenceEncoder` (mean-pooled, L2-normalised embedding, the
  sentence-transformers recipe; a ``1_Pooling`` config choosing CLS pooling is honoured);
- DINOv2 → :class:`VisionEncoder` (last hidden state, CLS first).

Everything else, or a broken directory, is an :class:`EdgekitError` with one line.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgekit.errors import EdgekitError
from edgekit.models.bundle import ModelBundle

# architecture (config.json "architectures"[0]) families we can wrap
CAUSAL_LM = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
TEXT_ENCODERS = ("bert", "roberta", "xlm-roberta", "distilbert")  # by model_type, any head
VISION_ENCODERS = ("dinov2",)
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MASK_VALUE = -1.0e4  # additive attention mask for padding; exp(-1e4) == 0 in float32


def supported() -> str:
    return ", ".join([*CAUSAL_LM, *(f"{t} encoders" for t in TEXT_ENCODERS), "Dinov2Model"])


# -- wrappers ------------------------------------------------------------------------------------
def additive_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, S] keep-mask (1 = token) -> [B, 1, 1, S] additive mask (0 or MASK_VALUE) for the scores."""
    return ((1.0 - attention_mask.to(torch.float32)) * MASK_VALUE)[:, None, None, :]


class SentenceEncoder(nn.Module):
    """``(input_ids, attention_mask) -> [B, D]`` sentence embedding over a BERT-like encoder.

    The padding mask is passed to the encoder as a ready 4-D additive mask: transformers' own mask
    construction uses ``aten.index``, which breaks pt2e calibration (see ASSETS.md).
    """

    def __init__(self, encoder: nn.Module, pooling: str = "mean", normalize: bool = True) -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise EdgekitError(f"pooling '{pooling}' is not supported (mean or cls)")
        self.encoder = encoder
        self.pooling = pooling
        self.normalize = normalize
        # explicit zeros: otherwise the encoder slices a registered buffer to the sequence length
        self.uses_token_types = encoder.config.model_type != "distilbert"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        keep = attention_mask.to(torch.float32)
        additive = additive_padding_mask(attention_mask)
        extra = {"token_type_ids": torch.zeros_like(input_ids)} if self.uses_token_types else {}
        hidden = self.encoder(input_ids=input_ids, attention_mask=additive, **extra).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = keep.unsqueeze(-1)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        if self.normalize:
            pooled = nn.functional.normalize(pooled, p=2.0, dim=-1)
        return pooled


class VisionEncoder(nn.Module):
    """``pixel_values [B, 3, H, W] -> last_hidden_state [B, 1 + P, D]``; ``attentions()`` for HiRED."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).last_hidden_state

    def attentions(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-layer attention probabilities [B, heads, 1+P, 1+P] (needs the eager attention)."""
        if self.model.config._attn_implementation != "eager":
            self.model.set_attn_implementation("eager")
        return self.model(pixel_values=pixel_values, output_attentions=True).attentions


# -- helpers -------------------------------------------------------------------------------------
def read_config(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise EdgekitError(f"{path}: not a directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise EdgekitError(f"{path}: no config.json (not a Hugging Face model directory)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise EdgekitError(f"{config_file}: not readable JSON ({type(error).__name__})") from None
    if not isinstance(config, dict):
        raise EdgekitError(f"{config_file}: expected a JSON object")
    return config


def _weights_hash(path: Path) -> str:
    """SHA-256 over the weight files (names + bytes), the bundle's source hash."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def _check_weights(path: Path) -> None:
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise EdgekitError(f"{path}: no weights (expected one of {', '.join(WEIGHT_FILES)})")


def _from_pretrained(loader: Callable[..., nn.Module], path: Path, **kwargs: Any) -> nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return loader(path, dtype=torch.float32, **kwargs).eval()
    except Exception as error:  # whatever the reader raises, the user's files are at fault
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise EdgekitError(f"{path}: cannot load weights ({type(error).__name__}: {first[:200]})") from None


def _tokenizer(path: Path):
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise EdgekitError(f"{path}: cannot load the tokenizer ({type(error).__name__})") from None


def _architecture(config: dict[str, Any]) -> str:
    architectures = config.get("architectures") or []
    return str(architectures[0]) if architectures else str(config.get("model_type", "unknown"))


def causal_lm_meta(model, tokenizer) -> dict:
    """JSON-friendly facts about a LLaMA-family checkpoint that exporters and recipes read."""
    config = model.config
    eos = config.eos_token_id
    eos_ids = sorted({*(eos if isinstance(eos, list) else [eos]), tokenizer.eos_token_id} - {None})
    rope = getattr(config, "rope_parameters", None) or {}
    heads = config.num_attention_heads
    return {
        "architecture": type(model).__name__,
        "num_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "vocab_size": config.vocab_size,
        "num_heads": heads,
        "num_kv_heads": config.num_key_value_heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "rope_theta": rope.get("rope_theta"),
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_ids": eos_ids,
    }


def text_preprocess(tokenizer, max_tokens: int = 256):
    """``preprocess(text) -> {"input_ids": [1, <=max_tokens]}`` for a causal LM."""

    def preprocess(text: str) -> dict[str, torch.Tensor]:
        if not isinstance(text, str) or not text:
            raise EdgekitError("a causal LM input must be a non-empty string")
        ids = tokenizer(text, truncation=True, max_length=max_tokens, return_tensors="pt").input_ids
        return {"input_ids": ids.to(torch.long)}

    return preprocess


# -- the three families --------------------------------------------------------------------------
def _causal_lm(path: Path, config: dict[str, Any], max_tokens: int | None) -> ModelBundle:
    from transformers import AutoModelForCausalLM

    from edgekit.models.llama import CausalLMWithCache

    window = config.get("sliding_window")
    if (
        window is not None
        and config.get("use_sliding_window", True)
        and window < config.get("max_position_embeddings", 0)
    ):
        raise EdgekitError(f"{path}/config.json: sliding-window attention ({window}) is not supported")
    hf_model = _from_pretrained(AutoModelForCausalLM.from_pretrained, path)
    module = CausalLMWithCache(hf_model).eval()
    tokenizer = _tokenizer(path)
    limit = max_tokens or 256
    if tokenizer is not None:
        preprocess = text_preprocess(tokenizer, limit)
        example = preprocess("The quick brown fox jumps over the lazy dog near the river bank.")
    else:
        vocab = int(hf_model.config.vocab_size)

        def preprocess(ids: Any) -> dict[str, torch.Tensor]:
            array = np.asarray(ids, dtype=np.int64).reshape(1, -1)[:, :limit]
            if array.size == 0 or array.min() < 0 or array.max() >= vocab:
                raise EdgekitError(f"token ids must be a non-empty sequence in [0, {vocab})")
            return {"input_ids": torch.from_numpy(array)}

        example = {"input_ids": (torch.arange(16, dtype=torch.long) % vocab)[None]}
    meta = causal_lm_meta(hf_model, tokenizer) if tokenizer is not None else {}
    return ModelBundle(
        spec=str(path),
        module=module,
        example_inputs=example,
        task="causal-lm",
        output_names=["logits"],
        dynamic_axes={"input_ids": {1: "sequence"}},
        preprocess=preprocess,
        tokenizer=tokenizer,
        dataset="wikipedia",
        source_hash=_weights_hash(path),
        description=f"{_architecture(config)} from {path.name}",
        meta={**meta, "checkpoint_dir": str(path), "max_tokens": limit},
    )


def _pooling(path: Path) -> tuple[str, bool]:
    """sentence-transformers' pooling choice (``1_Pooling/config.json``, ``modules.json``)."""
    pooling, normalize = "mean", True
    pooling_file = path / "1_Pooling" / "config.json"
    if pooling_file.is_file():
        settings = json.loads(pooling_file.read_text())
        if settings.get("pooling_mode_cls_token"):
            pooling = "cls"
        elif not settings.get("pooling_mode_mean_tokens", True):
            raise EdgekitError(f"{pooling_file}: only mean or CLS pooling is supported")
    modules_file = path / "modules.json"
    if modules_file.is_file():
        kinds = [entry.get("type", "") for entry in json.loads(modules_file.read_text())]
        normalize = any(kind.endswith("Normalize") for kind in kinds)
    return pooling, normalize


def _text_encoder(path: Path, config: dict[str, Any], max_tokens: int | None) -> ModelBundle:
    from transformers import AutoModel

    tokenizer = _tokenizer(path)
    if tokenizer is None:
        raise EdgekitError(f"{path}: a text encoder needs its tokenizer files (tokenizer.json or vocab.txt)")
    encoder = _from_pretrained(AutoModel.from_pretrained, path, attn_implementation="eager")
    pooling, normalize = _pooling(path)
    module = SentenceEncoder(encoder, pooling, normalize).eval()
    limit = int(max_tokens or min(getattr(encoder.config, "max_position_embeddings", 512), 512))

    def preprocess(text: str) -> dict[str, torch.Tensor]:
        if not isinstance(text, str) or not text:
            raise EdgekitError("a text encoder input must be a non-empty string")
        encoded = tokenizer(text, truncation=True, max_length=limit, return_tensors="pt")
        return {
            "input_ids": encoded["input_ids"].to(torch.long),
            "attention_mask": encoded["attention_mask"].to(torch.long),
        }

    return ModelBundle(
        spec=str(path),
        module=module,
        example_inputs=preprocess("A man is eating a piece of bread."),
        task="text-encoder",
        output_names=["embedding"],
        dynamic_axes={"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}},
        preprocess=preprocess,
        tokenizer=tokenizer,
        dataset="lee",
        source_hash=_weights_hash(path),
        description=f"{_architecture(config)} sentence encoder ({pooling} pooling) from {path.name}",
        meta={
            "hidden_size": encoder.config.hidden_size,
            "num_layers": encoder.config.num_hidden_layers,
            "pooling": pooling,
            "normalize": normalize,
            "max_tokens": limit,
            "checkpoint_dir": str(path),
        },
    )


def image_preprocess(size: int = 224, resize: int = 256, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """``preprocess(HxWx3 uint8) -> {"pixel_values": [1, 3, size, size]}``: shorter side to
    ``resize`` (bicubic), centre crop ``size``, ImageNet normalisation (the DINOv2 eval transform)."""
    from PIL import Image

    mean_array = np.asarray(mean, dtype=np.float32)[:, None, None]
    std_array = np.asarray(std, dtype=np.float32)[:, None, None]

    def preprocess(image: Any) -> dict[str, torch.Tensor]:
        array = np.asarray(image)
        if array.ndim == 2:
            array = np.stack([array] * 3, axis=-1)
        if array.ndim != 3 or array.shape[-1] not in (3, 4) or min(array.shape[:2]) < 2:
            raise EdgekitError(f"expected an HxWx3 image, got shape {array.shape}")
        if array.dtype != np.uint8:
            if not np.isfinite(array).all():
                raise EdgekitError("image contains NaN or infinite values")
            scale = 255.0 if array.max() <= 1.0 else 1.0
            array = np.clip(array * scale, 0, 255).astype(np.uint8)
        picture = Image.fromarray(np.ascontiguousarray(array[..., :3]))
        width, height = picture.size
        ratio = resize / min(width, height)
        new_size = (max(size, round(width * ratio)), max(size, round(height * ratio)))
        picture = picture.resize(new_size, Image.Resampling.BICUBIC)
        left, top = (new_size[0] - size) // 2, (new_size[1] - size) // 2
        picture = picture.crop((left, top, left + size, top + size))
        pixels = np.asarray(picture, dtype=np.float32).transpose(2, 0, 1) / 255.0
        pixels = (pixels - mean_array) / std_array
        return {"pixel_values": torch.from_numpy(pixels[None].copy())}

    return preprocess


def vision_bundle(model: nn.Module, spec: str, size: int, source_hash: str, description: str) -> ModelBundle:
    """Bundle for a DINOv2-like ViT (shared by HF directories and the zoo's rebuilt DINOv2)."""
    module = VisionEncoder(model).eval()
    config = model.config
    patches = (size // config.patch_size) ** 2
    preprocess = image_preprocess(size)
    from skimage import data as skimage_data  # a real photo (offline) as the example input

    example = preprocess(skimage_data.chelsea())["pixel_values"]
    return ModelBundle(
        spec=spec,
        module=module,
        example_inputs={"pixel_values": example},
        task="vision-encoder",
        output_names=["last_hidden_state"],
        preprocess=preprocess,
        dataset="photos",
        source_hash=source_hash,
        description=description,
        meta={
            "hidden_size": config.hidden_size,
            "num_layers": config.num_hidden_layers,
            "num_heads": config.num_attention_heads,
            "patch_size": config.patch_size,
            "image_size": size,
            "num_patches": patches,
            "tokens": patches + 1,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
        },
    )


def _vision_encoder(path: Path, config: dict[str, Any]) -> ModelBundle:
    from transformers import Dinov2Model

    model = _from_pretrained(Dinov2Model.from_pretrained, path, attn_implementation="eager")
    size = int(config.get("image_size", 224))
    processor = path / "preprocessor_config.json"
    if processor.is_file():  # e.g. facebook/dinov2-*: config says 518, the eval transform crops 224
        crop = json.loads(processor.read_text()).get("crop_size")
        size = int(crop.get("height", size) if isinstance(crop, dict) else crop or size)
    return vision_bundle(model, str(path), size, _weights_hash(path), f"Dinov2Model from {path.name}")


def load_directory(path: str | Path, max_tokens: int | None = None) -> ModelBundle:
    """Wrap the model in a local Hugging Face directory (see the module docstring for families)."""
    path = Path(path).expanduser()
    config = read_config(path)
    architecture = _architecture(config)
    model_type = str(config.get("model_type", ""))
    if architecture in CAUSAL_LM:
        kind = "causal"
    elif model_type in TEXT_ENCODERS:
        kind = "text"
    elif model_type in VISION_ENCODERS:
        kind = "vision"
    else:
        raise EdgekitError(
            f"{path / 'config.json'}: architecture {architecture} is not supported (supported: {supported()})"
        )
    _check_weights(path)
    if kind == "causal":
        return _causal_lm(path, config, max_tokens)
    if kind == "text":
        return _text_encoder(path, config, max_tokens)
    return _vision_encoder(path, config)
