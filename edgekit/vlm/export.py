"""Export a ViT for on-device HiRED: patch features plus the two CLS-attention rows as outputs.

The selection needs the early and late layers' CLS attention; exporting them as extra graph
outputs (heads already summed, [partitions, patches] each) lets the torch-free runtime
(:class:`edgekit.runtime.hired.HiredEncoder`) pick the tokens on the device. The graph is written
by the ordinary ONNX exporter; ``hired.json`` beside it records the layers and patch grid.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from edgekit.exporters.onnx import OnnxExport, export_onnx
from edgekit.models.bundle import ModelBundle
from edgekit.runtime.hired import ENCODER_CONFIG, ENCODER_OUTPUTS, HiredSettings
from edgekit.vlm.hired import ClsAttentionViT


def export_hired_encoder(
    vit: torch.nn.Module,
    out_dir: Path,
    image_size: int,
    settings: HiredSettings = HiredSettings(),
    feature_layer: int | None = None,
) -> OnnxExport:
    """Write ``model.onnx`` (dynamic partition count) and ``hired.json`` under ``out_dir``."""
    module = ClsAttentionViT(vit, settings, feature_layer)
    patch = int(vit.config.patch_size)
    example = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    bundle = ModelBundle(
        spec="hired-encoder",
        module=module,
        example_inputs={"pixel_values": example},
        task="vision-encoder",
        output_names=list(ENCODER_OUTPUTS),
        dynamic_axes={"pixel_values": {0: "partitions"}},
        description="ViT with CLS-attention rows for HiRED",
    )
    out_dir = Path(out_dir)
    result = export_onnx(bundle, out_dir)
    config = {
        "file": result.main.path.name,
        "patch_grid": [image_size // patch, image_size // patch],
        "early_layer": module.early_layer,
        "late_layer": module.late_layer,
        "depth": int(vit.config.num_hidden_layers),
        "outputs": list(ENCODER_OUTPUTS),
    }
    (out_dir / ENCODER_CONFIG).write_text(json.dumps(config, indent=1))
    return result
