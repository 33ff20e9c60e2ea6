"""Integer-only sorted bundles: every segment and the head as QDQ graphs, still sharing one weights file.

Each graph is quantized with onnxruntime's static QDQ quantizer (:func:`edgekit.exporters.onnx.
quantize_qdq`) under MobileQuant's bit-width plan: 8-bit matmul inputs and weights (per-tensor,
per-channel for ``down_proj``), 16-bit norms, softmax and other non-linear ops. Calibration feeds
for a segment are what the float bundle's earlier segments produce on calibration text (a prefill
chunk with an empty past, then one decode step against that past), so every depth's graphs see
the activations they will see at run time. Because segments are quantized once and shared, every
depth is integer-only with one copy of the weights.

What this is not (yet): MobileQuant's *learned* transforms and ranges optimised over all depths
jointly; ranges here are min-max calibrated.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgekit.exporters.onnx import WEIGHTS_FILE, quantize_qdq, save_sharing_weights
from edgekit.quantize.llama import SIXTEEN_BIT_OPS
from edgekit.quantize.spec import QuantSpec
from edgekit.runtime.sorted import SortedModel, State


def mobilequant_plan(samples: int) -> QuantSpec:
    """MobileQuant's W8A8 bit-widths (see PAPERS.md), min-max calibrated."""
    return QuantSpec(
        weight_bits=8,
        weight_per_channel=False,
        activation_bits=8,
        calibration="minmax",
        sixteen_bit_ops=SIXTEEN_BIT_OPS,
        per_channel_modules=("*down_proj",),
        samples=samples,
    )


def calibration_feeds(runner: SortedModel, texts: Sequence[np.ndarray]) -> dict[str, list[dict[str, np.ndarray]]]:
    """Per graph, the inputs the float bundle gives it: each text's prefill, then one decode step."""
    feeds: dict[str, list[dict[str, np.ndarray]]] = {s.graph: [] for s in runner.segments}
    feeds[runner.head_graph] = []
    for ids in texts:
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        state = State()
        for chunk in (ids[:, :-1], ids[:, -1:]):  # prefill (empty past), then decode (with past)
            hidden: np.ndarray = chunk
            for index, segment in enumerate(runner.segments):
                feed = {"input_ids" if index == 0 else "hidden": hidden}
                for layer in segment.layers:
                    key, value = state.cache.get(layer, (runner._empty(), runner._empty()))
                    feed[f"past.{layer}.key"], feed[f"past.{layer}.value"] = key, value
                feeds[segment.graph].append(feed)
                hidden = runner._run_segment(index, hidden, state)
            feeds[runner.head_graph].append({"hidden": hidden})
    return feeds


def quantize_graphs(
    runner: SortedModel, texts: Sequence[np.ndarray], out_dir: Path, work: Path, spec: QuantSpec | None = None
) -> tuple[dict[str, Path], dict[str, Any]]:
    """QDQ copies of the float bundle's graphs in ``out_dir`` (sharing ``weights.bin``), and a summary."""
    spec = spec or mobilequant_plan(2 * len(texts))
    feeds = calibration_feeds(runner, texts)
    models: dict[str, onnx.ModelProto] = {}
    summary: dict[str, Any] = {}
    for name, graph_feeds in feeds.items():
        target = work / name / f"{name}.onnx"
        target.parent.mkdir(parents=True, exist_ok=True)
        summary[name], _ = quantize_qdq(
            runner.directory / runner.files[name], target, spec, graph_feeds, work / f"{name}-work"
        )
        model = onnx.load(str(target), load_external_data=True)
        del model.metadata_props[:]
        models[name] = model
    save_sharing_weights(models, out_dir, WEIGHTS_FILE)
    return {name: out_dir / f"{name}.onnx" for name in models}, summary
