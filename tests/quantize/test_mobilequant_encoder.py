"""MobileQuant on encoders (a BERT sentence encoder, a DINOv2 vision encoder): the transforms are
exact equivalences, the recipe's learned ranges are the QDQ scales in the exported file, the file
runs in onnxruntime as the simulated model does and is integer-only on the Snapdragon NPU profile;
the real MiniLM and DINOv2 (two layers each) go through the whole recipe."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from test_mobilequant_export import qdq_params
from transformers import BertConfig, BertModel, Dinov2Config, Dinov2Model

from edgekit import recipes
from edgekit.calibrate import calibration_inputs
from edgekit.errors import EdgekitError
from edgekit.evaluate import cosine, sqnr_db
from edgekit.exporters.verify import onnx_session
from edgekit.models.bundle import ModelBundle
from edgekit.models.hf import SentenceEncoder, VisionEncoder
from edgekit.quantize import mobilequant
from edgekit.quantize.encoder import QuantEncoder, quant_encoder

onnx_exporter = pytest.importorskip("edgekit.exporters.onnx")


def _perturb(module: torch.nn.Module) -> torch.nn.Module:
    """Random LayerNorm weights and biases, so the norm transforms have something to move."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for norm in module.modules():
            if isinstance(norm, torch.nn.LayerNorm):
                norm.weight.copy_(0.5 + torch.rand(norm.weight.shape, generator=generator))
                norm.bias.copy_(0.1 * torch.randn(norm.bias.shape, generator=generator))
    return module.eval()


def tiny_bert() -> ModelBundle:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    module = SentenceEncoder(_perturb(BertModel(config, add_pooling_layer=False)), "mean", True).eval()
    return ModelBundle(
        spec="test:tiny-bert",
        module=module,
        example_inputs=text_feed(10, seed=9),
        task="text-encoder",
        output_names=["embedding"],
        dynamic_axes={"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}},
    )


def tiny_dinov2() -> ModelBundle:
    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        mlp_ratio=2,
        patch_size=14,
        image_size=42,
        layerscale_value=0.5,
        attn_implementation="eager",
    )
    model = _perturb(Dinov2Model(config))
    with torch.no_grad():  # trained-looking [CLS], positions and LayerScale, not init's zeros and constants
        model.embeddings.cls_token.normal_()
        model.embeddings.position_embeddings.normal_(std=0.5)
        for layer in model.encoder.layer:
            for scale in (layer.layer_scale1, layer.layer_scale2):
                scale.lambda1.uniform_(0.2, 1.5)
    return ModelBundle(
        spec="test:tiny-dinov2",
        module=VisionEncoder(model).eval(),
        example_inputs=image_feed(seed=9),
        task="vision-encoder",
        output_names=["last_hidden_state"],
    )


def text_feed(length: int, seed: int, padding: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(1, length, dtype=torch.long)
    if padding:
        mask[:, -padding:] = 0
    return {"input_ids": torch.randint(1, 97, (1, length), generator=generator), "attention_mask": mask}


def image_feed(seed: int) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(1, 3, 42, 42, generator=torch.Generator().manual_seed(seed))}


def numpy_feeds(feeds: list[dict[str, torch.Tensor]]) -> list[dict[str, np.ndarray]]:
    return [{name: value.numpy() for name, value in feed.items()} for feed in feeds]


BUILDERS = {"bert": tiny_bert, "dinov2": tiny_dinov2}


def sample_feeds(family: str, count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    if family == "bert":
        return [text_feed(6 + i % 5, seed + i) for i in range(count)]
    return [image_feed(seed + i) for i in range(count)]


@torch.no_grad()
@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_every_transform_keeps_the_float_function(family) -> None:
    bundle = BUILDERS[family]()
    model = quant_encoder(bundle.module, clip_init=40.0)  # sigmoid(40) == 1: no clipping
    generator = torch.Generator().manual_seed(7)
    for parameter in model.transform_parameters():
        parameter.copy_(0.2 + 3.0 * torch.rand(parameter.shape, generator=generator))
    feeds = sample_feeds(family, 2, seed=20)
    if family == "bert":  # padded positions must stay masked in the transformed domain
        feeds.append(text_feed(9, seed=30, padding=3))
    references = [bundle.module(**feed) for feed in feeds]
    for feed, reference in zip(feeds, references, strict=True):
        assert (model(**feed) - reference).abs().max() < 1e-5
    model.fold()
    assert all(float((p - 1).abs().max()) == 0 for p in model.transform_parameters())
    for feed, reference in zip(feeds, references, strict=True):
        assert (model(**feed) - reference).abs().max() < 1e-5


def test_a_model_of_another_family_gets_a_clear_error(small_conv) -> None:
    with pytest.raises(EdgekitError, match="BERT sentence encoders, DINOv2 vision encoders and plain conv"):
        QuantEncoder(small_conv.module)


def _graph_tensors(path) -> dict[str, str]:
    model = onnx.load(str(path), load_external_data=False)
    return onnx_exporter.module_outputs(model, onnx_exporter.module_scopes(model, ""))


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_the_recipe_exports_its_learned_ranges_as_an_integer_graph(family, tmp_path) -> None:
    from edgekit.devices.check import check
    from edgekit.exporters.onnx_ops import onnx_op_stats

    bundle = BUILDERS[family]()
    data = numpy_feeds(sample_feeds(family, 6))
    config = mobilequant.Config(samples=6, epochs=2, batch_size=2)
    quantized = mobilequant.apply(bundle, data, config)
    # equal-length feeds are stacked (the images, two per batch); the texts differ in length
    assert quantized.meta["mobilequant"]["steps"] == 2 * (3 if family == "dinov2" else 6)

    result = onnx_exporter.export_onnx(quantized, tmp_path / "qdq", data)
    path = result.graphs["model"].path
    floats = onnx_exporter.export_onnx(quantized.replace(quant=None), tmp_path / "fp32")
    params, tensors = qdq_params(path), _graph_tensors(floats.graphs["model"].path)
    for site, override in quantized.quant.overrides.items():
        scale, zero, bits = params[tensors.get(site, site)]  # a module's output, or a graph input
        assert (bits, zero) == (override.bits, override.zero_point), site
        assert scale == pytest.approx(override.scale, rel=1e-6), site

    session = onnx_session(path)
    for feed in sample_feeds(family, 2, seed=50):
        runtime = session.run(None, {name: value.numpy() for name, value in feed.items()})[0]
        with torch.no_grad():
            simulated = quantized.simulated(**feed).numpy()
            folded_float = quantized.module(**feed).numpy()
        assert sqnr_db(simulated, runtime) > 30.0, family
        assert sqnr_db(simulated, runtime) > sqnr_db(folded_float, runtime) + 5.0  # it runs the quantized model

    if family == "bert":  # padding stays masked in the integer graph: a padded text embeds as its prefix
        padded, prefix = text_feed(9, seed=60, padding=3), text_feed(6, seed=60)
        prefix["input_ids"] = padded["input_ids"][:, :6]
        outputs = [session.run(None, {k: v.numpy() for k, v in f.items()})[0] for f in (padded, prefix)]
        assert sqnr_db(*outputs) > 30.0

    size = sum(p.stat().st_size for p in (tmp_path / "qdq").iterdir())
    verdict = check(onnx_op_stats(path), size, None, "snapdragon-8gen3-npu", "onnx-qdq")
    assert verdict.passed, verdict.reasons
    assert verdict.integer_coverage_count == 1.0 and verdict.integer_coverage_flops == 1.0


def test_w4a8_keeps_berts_word_table_int8_per_row(tmp_path) -> None:
    """The simulation looks words up in a per-row int8 table under W4 too; so does the file."""
    bundle = tiny_bert()
    data = numpy_feeds(sample_feeds("bert", 4))
    config = mobilequant.Config(weight_bits=4, samples=4, epochs=0)
    quantized = mobilequant.apply(bundle, data, config)
    path = onnx_exporter.export_onnx(quantized, tmp_path / "w4", data).graphs["model"].path
    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name: i for i in model.graph.initializer}
    gathers = [n for n in model.graph.node if n.op_type == "Gather"]
    producers = {out: node for node in model.graph.node for out in node.output}
    word = quantized.module.embed.word.weight
    tables = [initializers[producers[g.input[0]].input[0]] for g in gathers if g.input[0] in producers]
    table_types = {t.data_type for t in tables if list(t.dims) == list(word.shape)}
    assert table_types == {onnx.TensorProto.INT8}
    matmul_weights = [i for i in initializers.values() if len(i.dims) == 2 and list(i.dims) != list(word.shape)]
    assert onnx.TensorProto.INT4 in {i.data_type for i in matmul_weights}
    session = onnx_session(path)
    feed = sample_feeds("bert", 1, seed=50)[0]
    runtime = session.run(None, {name: value.numpy() for name, value in feed.items()})[0]
    with torch.no_grad():
        simulated = quantized.simulated(**feed).numpy()
    assert sqnr_db(simulated, runtime) > 25.0


def _sliced(bundle: ModelBundle, layers: int = 2) -> ModelBundle:
    module = copy.deepcopy(bundle.module)
    inner = module.encoder if hasattr(module, "pooling") else module.model
    inner.encoder.layer = inner.encoder.layer[:layers]
    inner.config.num_hidden_layers = layers
    return bundle.replace(module=module.eval())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["minilm-l6", "dinov2-s14"])
def test_two_layers_of_a_real_encoder_through_the_recipe(name, tmp_path) -> None:
    from edgekit.models import load

    bundle = _sliced(load(f"zoo:{name}"))
    recipe = recipes.load("mobilequant-w8a8", {"samples": "4", "epochs": "2", "batch_size": "2"})
    calib = calibration_inputs(bundle, None, recipe.settings.samples)
    quantized = recipe.transform_module().apply(bundle, calib, recipe.settings)
    assert quantized.meta["mobilequant"]["mse_final"] < quantized.meta["mobilequant"]["mse_init"]
    result = onnx_exporter.export_onnx(quantized, tmp_path, calib)
    feed = calibration_inputs(bundle, None, 1, split="eval")[0]
    runtime = onnx_session(result.graphs["model"].path).run(None, feed)[0]
    with torch.no_grad():
        reference = bundle.module(**{k: torch.as_tensor(v) for k, v in feed.items()}).numpy()
    assert cosine(reference, runtime) > 0.98


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_the_int8_only_encoder_runs_as_pte_with_its_learned_ranges(family, tmp_path) -> None:
    from edgekit.exporters.executorch import export_pte
    from edgekit.runtime.pte import PteProgram

    bundle = BUILDERS[family]()
    data = numpy_feeds(sample_feeds(family, 4))
    config = mobilequant.Config(samples=4, epochs=1, batch_size=2, int8_only=True)
    quantized = mobilequant.apply(bundle, data, config)
    result = export_pte(quantized, tmp_path)
    feed = bundle.example_inputs
    output = PteProgram(result.path, list(feed)).run({k: v.numpy() for k, v in feed.items()})[0]
    with torch.no_grad():
        simulated = quantized.simulated(**feed).numpy()
        folded_float = quantized.module(**feed).numpy()
    # every site on the learned grid, norm weights and the patch convolution included: the int8
    # program reproduces the simulation's integers
    assert sqnr_db(simulated, output) > 40.0
    assert sqnr_db(simulated, output) > sqnr_db(folded_float, output) + 10.0
