"""Causal LM export: prefill + decode graphs with a KV cache, sharing one weights file."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from tiny_llama import tiny_llama_config
from transformers import LlamaForCausalLM

from edgekit.evaluate import sqnr_db
from edgekit.exporters.onnx import WEIGHTS_FILE, export_onnx, module_outputs, module_scopes
from edgekit.exporters.onnx_ops import onnx_op_stats
from edgekit.exporters.verify import compare, greedy_generate, onnx_session
from edgekit.models.bundle import ModelBundle
from edgekit.models.llama import CausalLMWithCache
from edgekit.quantize.spec import QuantSpec, TensorOverride

LAYERS = 2
FIXED_MODULE = "layers.0.mlp.down_proj"
FIXED = TensorOverride(bits=8, scale=0.0031, zero_point=131)


@pytest.fixture(scope="module")
def lm_bundle() -> ModelBundle:
    torch.manual_seed(0)
    config = tiny_llama_config(96, layers=LAYERS, hidden=48, heads=6, max_position_embeddings=128)
    hf = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper logits than the init gives, so greedy choices are decisive
        hf.lm_head.weight.mul_(8.0)
    module = CausalLMWithCache(hf).eval()
    return ModelBundle(
        spec="test:tiny-llama",
        module=module,
        example_inputs={"input_ids": torch.randint(0, 96, (1, 8))},
        task="causal-lm",
        output_names=["logits"],
        dynamic_axes={"input_ids": {1: "sequence"}},
    )


@pytest.fixture(scope="module")
def lm_fp32(lm_bundle, tmp_path_factory):
    return export_onnx(lm_bundle, tmp_path_factory.mktemp("lm-fp32"))


@pytest.fixture(scope="module")
def lm_q8(lm_bundle, tmp_path_factory):
    generator = torch.Generator().manual_seed(5)
    calib = [{"input_ids": torch.randint(0, 96, (1, 24), generator=generator).numpy()} for _ in range(8)]
    plan = QuantSpec(overrides={FIXED_MODULE: FIXED})  # a learned range, by module path
    return export_onnx(lm_bundle.replace(quant=plan), tmp_path_factory.mktemp("lm-q8"), calib)


def torch_greedy(module: CausalLMWithCache, ids: np.ndarray, steps: int) -> list[int]:
    with torch.no_grad():
        outputs = module.prefill(torch.from_numpy(ids))
        tokens = []
        for _ in range(steps):
            token = int(outputs[0][0, -1].argmax())
            tokens.append(token)
            outputs = module.decode(torch.tensor([[token]]), *outputs[1:])
    return tokens


def _external_bytes(path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in init.external_data}
            assert entries["location"] == WEIGHTS_FILE
            total += int(entries["length"])
    return total


def test_graph_interfaces(lm_fp32):
    assert sorted(p.name for p in lm_fp32.files) == ["decode.onnx", "prefill.onnx", WEIGHTS_FILE]
    prefill, decode = lm_fp32.graphs["prefill"], lm_fp32.graphs["decode"]
    assert [t.name for t in prefill.inputs] == ["input_ids"]
    assert prefill.inputs[0].shape == [1, "sequence"] and prefill.inputs[0].dtype == "int64"
    presents = [f"present.{i}.{kind}" for i in range(LAYERS) for kind in ("key", "value")]
    assert [t.name for t in prefill.outputs] == ["logits", *presents]
    assert prefill.outputs[1].shape == [1, 2, "sequence", 8]
    assert [t.name for t in decode.inputs] == ["input_ids", *[p.replace("present", "past") for p in presents]]
    assert decode.inputs[1].shape == [1, 2, "past_sequence", 8]
    assert decode.outputs[0].shape == [1, 1, 96]
    assert [t.name for t in decode.outputs] == ["logits", *presents]


def test_fp32_prefill_matches_torch(lm_bundle, lm_fp32):
    session = onnx_session(lm_fp32.graphs["prefill"].path)
    for length in (3, 17):
        ids = np.random.default_rng(length).integers(0, 96, (1, length))
        with torch.no_grad():
            reference = lm_bundle.module.prefill(torch.from_numpy(ids))
        outputs = session.run(None, {"input_ids": ids})
        for got, want in zip(outputs, reference, strict=True):
            np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=1e-4)


def test_fp32_greedy_decode_equals_torch(lm_bundle, lm_fp32):
    prefill = onnx_session(lm_fp32.graphs["prefill"].path)
    decode = onnx_session(lm_fp32.graphs["decode"].path)
    seen = set()
    for seed in range(3):
        ids = np.random.default_rng(seed).integers(0, 96, (1, 3 + 2 * seed))
        expected = torch_greedy(lm_bundle.module, ids, 10)
        assert greedy_generate(prefill, decode, ids, 10) == expected
        seen.update(expected)
    assert len(seen) > 1  # generations differ between prompts: the comparison has teeth


def test_graphs_share_one_weights_file(lm_bundle, lm_fp32):
    weights = (lm_fp32.out_dir / WEIGHTS_FILE).stat().st_size
    parameter_bytes = 4 * lm_bundle.parameter_count()
    prefill = _external_bytes(lm_fp32.graphs["prefill"].path)
    decode = _external_bytes(lm_fp32.graphs["decode"].path)
    # each graph references (nearly) all the weights, the file holds them once
    assert prefill > 0.9 * parameter_bytes and decode > 0.9 * parameter_bytes
    assert weights < 1.25 * parameter_bytes < prefill + decode
    for graph in lm_fp32.graphs.values():
        assert graph.path.stat().st_size < 0.5 * weights


def test_qdq_lm_runs_in_integer_and_tracks_torch(lm_bundle, lm_q8):
    for role, shapes in (("prefill", {"input_ids": (1, 8)}), ("decode", {"input_ids": (1, 1)})):
        stats = onnx_op_stats(lm_q8.graphs[role].path, shapes)
        matmuls = [row for row in stats if row.op_type == "MatMul"]
        assert matmuls and all(row.integer and row.activation_bits == 8 for row in matmuls)
        assert sum(row.count for row in matmuls if row.weight_bits == 8) == 7 * LAYERS + 1
    fp32_weights = 4 * lm_bundle.parameter_count()
    assert (lm_q8.out_dir / WEIGHTS_FILE).stat().st_size < 0.4 * fp32_weights
    assert lm_q8.quantization["decode_steps"] >= 8

    ids = np.random.default_rng(1).integers(0, 96, (1, 12))
    prefill = onnx_session(lm_q8.graphs["prefill"].path)
    decode = onnx_session(lm_q8.graphs["decode"].path)
    with torch.no_grad():
        reference = lm_bundle.module.prefill(torch.from_numpy(ids))
        step = lm_bundle.module.decode(torch.tensor([[7]]), *reference[1:])
    outputs = prefill.run(None, {"input_ids": ids})
    assert compare(reference[0].numpy(), outputs[0], "causal-lm")["sqnr_db"] > 15.0
    feed = {"input_ids": np.array([[7]])}
    feed.update({f"past.{i // 2}.{('key', 'value')[i % 2]}": t.numpy() for i, t in enumerate(reference[1:])})
    decoded = decode.run(None, feed)
    assert sqnr_db(step[0].numpy(), decoded[0]) > 15.0
    assert decoded[1].shape == (1, 2, 13, 8)
    # the quantized pair still generates through its own KV cache
    tokens = greedy_generate(prefill, decode, ids, 6)
    assert len(tokens) == 6 and all(0 <= t < 96 for t in tokens)


def test_module_override_lands_in_both_graphs(lm_q8):
    """Tensor names differ between the traced prefill and decode graphs; module paths do not."""
    for graph in lm_q8.graphs.values():
        model = onnx.load(str(graph.path), load_external_data=False)
        inits = {
            i.name: numpy_helper.to_array(i)
            for i in model.graph.initializer
            if i.data_location != onnx.TensorProto.EXTERNAL
        }
        tensor = module_outputs(model, module_scopes(model, "model."))[FIXED_MODULE]
        (q,) = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor]
        assert inits[q.input[1]].item() == np.float32(FIXED.scale)
        assert inits[q.input[2]].dtype == np.uint8 and inits[q.input[2]].item() == FIXED.zero_point


def test_prefill_only_export_writes_one_graph_equal_to_the_full_exports(lm_bundle, lm_fp32, tmp_path):
    result = export_onnx(lm_bundle, tmp_path / "prefill-only", decode=False)
    assert set(result.graphs) == {"prefill"}
    assert sorted(p.name for p in (tmp_path / "prefill-only").iterdir()) == sorted(["prefill.onnx", WEIGHTS_FILE])
    ids = np.random.default_rng(3).integers(0, 96, (1, 9))
    alone = onnx_session(result.graphs["prefill"].path).run(None, {"input_ids": ids})
    paired = onnx_session(lm_fp32.graphs["prefill"].path).run(None, {"input_ids": ids})
    for got, want in zip(alone, paired, strict=True):
        np.testing.assert_array_equal(got, want)


def test_ptq_lm_quantizes_only_matmul_inputs_and_computes_the_simulated_model(lm_bundle, tmp_path):
    """ptq's gemm-inputs scope reaches both LM graphs: norms, softmax, residual adds and the KV
    cache outputs stay float, as in the pt2e program (all-int8 put the file 9 dB from float on
    SmolLM2's first two layers, where the simulated model is 24 dB); the token table is int8 in
    both the file and the simulated model."""
    from edgekit.quantize import ptq

    generator = torch.Generator().manual_seed(6)
    calib = [{"input_ids": torch.randint(0, 96, (1, 8), generator=generator).numpy()} for _ in range(8)]
    quantized = ptq.apply(lm_bundle, calib, ptq.Config(samples=8))
    export = export_onnx(quantized, tmp_path, calib)
    assert export.quantization["quantized_op_types"] == ["Gather", "MatMul"]
    for role in ("prefill", "decode"):
        model = onnx.load(str(export.graphs[role].path), load_external_data=False)
        producers = {out: node.op_type for node in model.graph.node for out in node.output}
        assert all(producers[output.name] != "DequantizeLinear" for output in model.graph.output)
        readers = {n.op_type for n in model.graph.node for i in n.input if producers.get(i) == "DequantizeLinear"}
        assert readers <= {"MatMul", "Gather", "Transpose", "Reshape"}, readers
        # the embedding table is stored int8 (per row) and looked up through its DequantizeLinear
        assert any(n.op_type == "Gather" and producers.get(n.input[0]) == "DequantizeLinear" for n in model.graph.node)
    ids = calib[0]["input_ids"]
    runtime = onnx_session(export.graphs["prefill"].path).run(None, {"input_ids": ids})
    with torch.no_grad():
        simulated = quantized.simulated(input_ids=torch.from_numpy(ids)).numpy()
        present = lm_bundle.module.prefill(torch.from_numpy(ids))[1:]
    assert sqnr_db(simulated, runtime[0]) > 30.0
    for got, want in zip(runtime[1:], present, strict=True):
        assert sqnr_db(want.numpy(), got) > 30.0
