"""Integer-only sorted bundle (MobileQuant's bit plan, QDQ per graph) of a tiny LLaMA: every depth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edgekit.evaluate import sqnr_db
from edgekit.models.llama import CausalLMWithCache
from edgekit.runtime.sorted import SortedModel
from edgekit.sorted.export import export_graphs, segments_of
from edgekit.sorted.quantize import quantize_graphs
from tests.sorted.tiny import tiny_llama, token_ids

DEPTHS = [2, 4, 6]


@pytest.fixture(scope="module")
def runners(tmp_path_factory) -> tuple[SortedModel, SortedModel, Path, Path]:
    model = tiny_llama()
    with torch.no_grad():  # sharper logits than the random init gives, so top-1 choices are decisive
        model.lm_head.weight.mul_(8.0)
    module = CausalLMWithCache(model)
    root = tmp_path_factory.mktemp("sorted-q")
    paths = export_graphs(module, DEPTHS, root / "fp32", root / "work")
    info = {
        "depths": DEPTHS,
        "segments": segments_of(DEPTHS),
        "head": "head",
        "num_kv_heads": module.num_kv_heads,
        "head_dim": module.head_dim,
    }
    files = {name: path.name for name, path in paths.items()}
    fp32 = SortedModel(root / "fp32", info, files)
    texts = [token_ids(24, seed=seed)[0].numpy() for seed in range(8)]
    q_paths, _ = quantize_graphs(fp32, texts, root / "int8", root / "qwork")
    quantized = SortedModel(root / "int8", info, {name: path.name for name, path in q_paths.items()})
    return fp32, quantized, root / "fp32", root / "int8"


def test_every_matmul_of_every_graph_reads_quantized_inputs(runners) -> None:
    _, quantized, _, directory = runners
    for name in quantized.files.values():
        graph = onnx.load(str(directory / name), load_external_data=False).graph
        dequantized = {out for node in graph.node if node.op_type == "DequantizeLinear" for out in node.output}
        matmuls = [node for node in graph.node if node.op_type in ("MatMul", "Gemm")]
        assert matmuls, name
        for node in matmuls:
            assert all(value in dequantized for value in node.input[:2]), (name, node.name, list(node.input))


def test_every_depth_tracks_the_float_bundle(runners) -> None:
    fp32, quantized, _, _ = runners
    ids = token_ids(20, seed=99).numpy()
    reference, candidate = fp32.all_exit_logits(ids), quantized.all_exit_logits(ids)
    for depth in DEPTHS:
        assert sqnr_db(reference[depth], candidate[depth]) > 15, depth
        assert np.mean(reference[depth].argmax(-1) == candidate[depth].argmax(-1)) >= 0.8, depth
    prompt = token_ids(6, seed=7)[0].tolist()
    assert quantized.generate(prompt, 6, depth="dynamic", thresholds=[0.0]).depths == [2] * 6


def test_quantized_weights_are_smaller_and_shared(runners) -> None:
    _, _, fp32_dir, int8_dir = runners
    assert (int8_dir / "weights.bin").stat().st_size < 0.5 * (fp32_dir / "weights.bin").stat().st_size
