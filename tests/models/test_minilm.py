"""zoo:minilm-l6 loads for real and behaves like the sentence-transformers model."""

from __future__ import annotations

import pytest
import torch

from edgekit.models import minilm
from edgekit.models.bundle import ModelBundle

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return minilm.load()


def embed(bundle: ModelBundle, text: str) -> torch.Tensor:
    with torch.no_grad():
        return bundle.module(**bundle.preprocess(text))[0]


def test_bundle_fields(bundle: ModelBundle) -> None:
    assert bundle.spec == "zoo:minilm-l6" and bundle.task == "text-encoder" and bundle.dataset == "lee"
    assert list(bundle.example_inputs) == ["input_ids", "attention_mask"]
    for tensor in bundle.example_inputs.values():
        assert tensor.dtype == torch.int64 and tensor.shape[0] == 1
    assert bundle.dynamic_axes == {"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}}
    assert bundle.meta["pooling"] == "mean" and bundle.meta["normalize"] is True
    output = bundle.module(**bundle.example_inputs)
    assert output.shape == (1, 384)
    assert torch.linalg.norm(output, dim=-1).item() == pytest.approx(1.0, abs=1e-5)


def test_similar_sentences_are_close(bundle: ModelBundle) -> None:
    food = embed(bundle, "A man is eating food.")
    bread = embed(bundle, "A man is eating a piece of bread.")
    baby = embed(bundle, "The girl is carrying a baby.")
    # all-MiniLM-L6-v2 gives 0.755 for this pair (sentence-transformers' documented example)
    assert float(food @ bread) == pytest.approx(0.755, abs=0.01)
    assert float(food @ baby) < 0.1


def test_preprocess_truncates_to_128_tokens(bundle: ModelBundle) -> None:
    inputs = bundle.preprocess("token " * 500)
    assert inputs["input_ids"].shape == (1, 128) and inputs["attention_mask"].shape == (1, 128)


def test_exports_with_a_dynamic_sequence_and_no_mask_indexing(bundle: ModelBundle) -> None:
    sequence = torch.export.Dim("sequence", min=2, max=128)
    program = torch.export.export(
        bundle.module,
        (),
        dict(bundle.example_inputs),
        dynamic_shapes={"input_ids": {1: sequence}, "attention_mask": {1: sequence}},
    )
    other = bundle.preprocess("A completely different and somewhat longer sentence about the weather today.")
    with torch.no_grad():
        torch.testing.assert_close(program.module()(**other), bundle.module(**other), atol=1e-5, rtol=1e-5)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("index.Tensor" in target for target in targets)
