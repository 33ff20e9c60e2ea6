"""MobileQuant through the ONNX exporter: the learned ranges are the QDQ scales in the .onnx files,
the graphs run in onnxruntime and agree with the simulated model, also with a massive activation
on the sink token (the residual-stream outlier that made SmolLM2's exported RMSNorms collapse)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from edgekit.models.bundle import ModelBundle
from edgekit.quantize import mobilequant
from edgekit.quantize.llama import LINEARS

onnx_exporter = pytest.importorskip("edgekit.exporters.onnx")

from mq_tiny import SINK_TOKEN, calib, tiny_llama  # noqa: E402

# ~60 in one residual channel of the sink token against ~0.02-1 elsewhere: 16-bit residual adds keep
# their resolution, but x² spans ~4e3, so an RMSNorm quantized op by op rounds every ordinary token's
# mean square to zero (measured without the fusion: export vs simulation 5.6 dB; with it, > 25 dB)
SINK_ACTIVATION = 0.01


def qdq_params(path: Path) -> dict[str, tuple[float, int, int]]:
    """Tensor -> (scale, zero point, bits) of the QuantizeLinear reading it, read back from the file."""
    model = onnx.load(str(path), load_external_data=False)
    constants = {
        init.name: numpy_helper.to_array(init)
        for init in model.graph.initializer
        if init.data_location != onnx.TensorProto.EXTERNAL  # scales and zero points are inline
    }
    for node in model.graph.node:
        if node.op_type == "Constant":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    outputs = {o.name for o in model.graph.output}
    params = {}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and {node.input[1], node.input[2]} <= set(constants):
            scale, zero = constants[node.input[1]], constants[node.input[2]]
            if scale.size != 1:
                continue
            # a graph output is written by its DequantizeLinear (the producer's tensor is renamed)
            name = node.input[0] if node.op_type == "QuantizeLinear" else node.output[0]
            if node.op_type == "QuantizeLinear" or name in outputs:
                params.setdefault(name, (float(scale), int(zero), zero.dtype.itemsize * 8))
    return params


def module_tensors(path: Path) -> dict[str, str]:
    """Module path -> output tensor, from an fp32 graph (the QDQ rewrite drops the scope metadata)."""
    model = onnx.load(str(path), load_external_data=False)
    return onnx_exporter.module_outputs(model, onnx_exporter.module_scopes(model, "model."))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    module = tiny_llama(sink_activation=SINK_ACTIVATION)
    bundle = ModelBundle(
        spec="test:tiny-llama",
        module=module,
        example_inputs={"input_ids": torch.randint(0, 101, (1, 8))},
        task="causal-lm",
        output_names=["logits"],
        dynamic_axes={"input_ids": {1: "sequence"}},
    )
    data = calib(6, 24, sink=True)
    config = mobilequant.Config(samples=6, seq_len=24, epochs=2, batch_size=2, lr_range=1e-4, lr_range_end=1e-5)
    quantized = mobilequant.apply(bundle, data, config)
    out = tmp_path_factory.mktemp("mq-onnx")
    result = onnx_exporter.export_onnx(quantized, out / "qdq", data)
    # the same folded module exported in float: its graph keeps the module scopes, and the QDQ
    # graph keeps its tensor names
    float_result = onnx_exporter.export_onnx(quantized.replace(quant=None), out / "fp32")
    return quantized, result, float_result


def test_learned_ranges_are_the_graphs_qdq_scales(exported) -> None:
    quantized, result, float_result = exported
    overrides = quantized.quant.overrides
    for role in ("prefill", "decode"):
        params = qdq_params(result.graphs[role].path)
        tensors = module_tensors(float_result.graphs[role].path)
        checked = 0
        for module_path, override in overrides.items():
            if role == "decode" and module_path.endswith(".masked"):
                assert module_path not in tensors  # decode has no causal-mask add: a prefill-only site
                continue
            tensor = tensors[module_path]
            assert tensor in params, f"{role}: no QuantizeLinear on {module_path} ({tensor})"
            scale, zero, bits = params[tensor]
            assert bits == override.bits, module_path
            assert zero == override.zero_point, module_path
            assert scale == pytest.approx(override.scale, rel=1e-6), module_path
            checked += 1
        prefill_only = sum(path.endswith(".masked") for path in overrides) if role == "decode" else 0
        assert checked == len(overrides) - prefill_only
        assert "embed_tokens" in overrides  # the lookup's output too: learned, 16-bit


def test_the_lookup_table_is_the_heads_int8_weights_stored_once(exported) -> None:
    quantized, result, _ = exported
    vocab, hidden = quantized.module.embed_tokens.weight.shape
    for role in ("prefill", "decode"):
        model = onnx.load(str(result.graphs[role].path), load_external_data=False)
        tables = [i for i in model.graph.initializer if sorted(i.dims) == sorted([vocab, hidden])]
        assert [onnx.TensorProto.DataType.Name(t.data_type) for t in tables] == ["INT8"], role
        # the head reads the Gather's table through a Transpose: one copy in the weights file
        assert any(n.op_type == "Transpose" and n.input[0] == tables[0].name for n in model.graph.node), role


def test_exported_graph_runs_and_matches_the_simulation(exported) -> None:
    from edgekit.evaluate import sqnr_db
    from edgekit.exporters.verify import onnx_session

    quantized, result, _ = exported
    session = onnx_session(result.graphs["prefill"].path)
    ids = torch.randint(1, 101, (1, 20), generator=torch.Generator().manual_seed(11))
    ids[0, 0] = SINK_TOKEN
    logits = session.run(None, {"input_ids": ids.numpy()})[0]
    with torch.no_grad():
        simulated = quantized.simulated(ids).numpy()
        floats = quantized.module(ids).numpy()
        residual = tiny_llama(sink_activation=SINK_ACTIVATION).hf_model.model(ids, output_hidden_states=True)
        residual = residual.hidden_states[1]  # after layer 0
    assert residual[0, 0].abs().max() > 100 * residual[0, 1:].abs().max()  # the outlier is there
    assert sqnr_db(simulated, logits) > 25.0
    assert sqnr_db(floats, logits) > 15.0
    assert np.mean(simulated.argmax(-1) == logits.argmax(-1)) > 0.9


def test_rms_norms_run_as_one_op_with_16_bit_weights(exported) -> None:
    """Each RMSNorm is one SimplifiedLayerNormalization (QNN's RmsNorm), its weight int16."""
    _, result, _ = exported
    for role in ("prefill", "decode"):
        model = onnx.load(str(result.graphs[role].path), load_external_data=False)
        ops = [node.op_type for node in model.graph.node]
        assert ops.count("SimplifiedLayerNormalization") == 2 * 2 + 1, role  # two per layer + final
        assert "ReduceMean" not in ops and "Sqrt" not in ops, role
        producers = {out: node for node in model.graph.node for out in node.output}
        initializers = {init.name: init for init in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type == "SimplifiedLayerNormalization":
                weight_dq = producers[node.input[1]]
                assert weight_dq.op_type == "DequantizeLinear"
                assert initializers[weight_dq.input[0]].data_type == onnx.TensorProto.INT16


def test_w4a8_keeps_the_head_and_its_table_int8_per_row(tmp_path) -> None:
    """Under W4 the block projections are int4 per channel; the head and the lookup table it shares
    stay int8 per row, stored once, as the simulation quantizes them: the file tracks it."""
    from edgekit.evaluate import sqnr_db
    from edgekit.exporters.verify import onnx_session

    bundle = ModelBundle(
        spec="test:tiny-llama",
        module=tiny_llama(),
        example_inputs={"input_ids": torch.randint(0, 101, (1, 8))},
        task="causal-lm",
        output_names=["logits"],
        dynamic_axes={"input_ids": {1: "sequence"}},
    )
    data = calib(4, 24)
    quantized = mobilequant.apply(bundle, data, mobilequant.Config(weight_bits=4, samples=4, seq_len=24, epochs=0))
    result = onnx_exporter.export_onnx(quantized, tmp_path / "w4", data, decode=False)
    model = onnx.load(str(result.graphs["prefill"].path), load_external_data=False)
    vocab, hidden = quantized.module.embed_tokens.weight.shape
    matrices = [i for i in model.graph.initializer if len(i.dims) == 2 and min(i.dims) > 1]
    tables = [i for i in matrices if sorted(i.dims) == sorted([vocab, hidden])]
    assert [onnx.TensorProto.DataType.Name(t.data_type) for t in tables] == ["INT8"]
    gather = next(n for n in model.graph.node if n.op_type == "Gather")
    table_dq = next(n for n in model.graph.node if n.output[0] == gather.input[0])
    assert table_dq.op_type == "DequantizeLinear" and table_dq.input[0] == tables[0].name
    assert any(n.op_type == "Transpose" and n.input[0] == tables[0].name for n in model.graph.node)
    projections = [i for i in matrices if i not in tables]
    assert len(projections) == len(LINEARS) * len(quantized.module.layers)
    assert {i.data_type for i in projections} == {onnx.TensorProto.INT4}
    ids = torch.randint(0, 101, (1, 20), generator=torch.Generator().manual_seed(5))
    logits = onnx_session(result.graphs["prefill"].path).run(None, {"input_ids": ids.numpy()})[0]
    with torch.no_grad():
        simulated = quantized.simulated(ids).numpy()
    assert sqnr_db(simulated, logits) > 25.0
