"""A 2-layer slice of the real SmolLM2-135M (its tokenizer, embedding, first two layers, head).

A model factory for ``edgekit export tests.sorted.smol_slice:bundle``: small enough to train two
steps and export in a test, real enough that the tokenizer, tied head and data path are SmolLM2's.
"""

from __future__ import annotations

from torch import nn

from edgekit.models.bundle import ModelBundle
from edgekit.models.llama import CausalLMWithCache

LAYERS = 2


def bundle() -> ModelBundle:
    from edgekit.models import smollm2

    full = smollm2.load()
    hf = full.module.hf_model
    hf.model.layers = nn.ModuleList(list(hf.model.layers)[:LAYERS])
    hf.config.num_hidden_layers = LAYERS
    return full.replace(
        spec="tests.sorted.smol_slice:bundle",
        module=CausalLMWithCache(hf).eval(),
        source_hash=f"{full.source_hash}-first{LAYERS}",
        description=f"SmolLM2-135M, first {LAYERS} layers",
        meta={**full.meta, "num_layers": LAYERS},
    )
