"""The exported SNN in real runtimes: predictions and per-layer spike maps equal torch's."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edgekit.snn.convert import convert
from edgekit.snn.network import UnrolledSNN, named_input


@pytest.fixture(scope="module")
def spiking(tiny_ann, fmnist):
    """The tiny net converted at T=3, one layer made leaky and a threshold moved so every op appears."""
    net = convert(tiny_ann, fmnist["train_x"][:64], timesteps=3)
    with torch.no_grad():
        net.lif_layers[1].leak.fill_(0.8)
        net.lif_layers[0].threshold.mul_(0.7)
    return net


def test_unrolled_equals_simulated(spiking, fmnist) -> None:
    x = fmnist["test_x"][:200]
    for steps in (1, 3):
        spiking.timesteps = steps
        unrolled = UnrolledSNN(spiking, return_spikes=True)
        with torch.no_grad():
            logits, spikes = spiking(x, return_spikes=True)
            exported = unrolled(x)
        torch.testing.assert_close(exported[0], logits, rtol=0, atol=1e-6)
        assert all(torch.equal(a, b) for a, b in zip(exported[1:], spikes, strict=True))
    spiking.timesteps = 3


def test_t1_graph_is_conv_compare_cast(spiking) -> None:
    spiking.timesteps = 1
    graph = torch.export.export(named_input(UnrolledSNN(spiking), "x"), (), {"x": torch.zeros(1, 1, 28, 28)})
    spiking.timesteps = 3
    ops = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    assert "aten.gt.Tensor" in ops or "aten.gt.Scalar" in ops
    assert not any("sub" in op or "mul" in op for op in ops)  # no reset, no leak at T=1


def _spike_agreement(runtime: list[np.ndarray], reference: tuple[torch.Tensor, ...]) -> float:
    same = sum(int((a == b.numpy()).sum()) for a, b in zip(runtime[1:], reference[1:], strict=True))
    return same / sum(b.numel() for b in reference[1:])


def test_onnxruntime_spike_maps_match_torch(spiking, fmnist, tmp_path) -> None:
    module = named_input(UnrolledSNN(spiking, return_spikes=True), "x").eval()
    x = fmnist["test_x"][:64]
    path = tmp_path / "snn.onnx"
    torch.onnx.export(
        module, (), kwargs={"x": x[:2]}, f=str(path), dynamo=True, opset_version=21,
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, verbose=False,
    )  # fmt: skip
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    runtime = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        reference = module(x=x)
    assert len(runtime) == 1 + 3 and runtime[1].shape == (3, 64, 6, 14, 14)
    assert _spike_agreement(runtime, reference) >= 0.999
    assert 0.01 < float(reference[1].mean()) < 0.99  # the maps are neither silent nor saturated
    assert (runtime[0].argmax(-1) == reference[0].numpy().argmax(-1)).all()
    np.testing.assert_allclose(runtime[0], reference[0].numpy(), atol=1e-4)


def test_executorch_spike_maps_match_torch(spiking, fmnist, tmp_path) -> None:
    lowering = pytest.importorskip("executorch.exir")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.runtime import Runtime

    spiking.timesteps = 2
    module = named_input(UnrolledSNN(spiking, return_spikes=True), "x").eval()
    spiking.timesteps = 3
    x = fmnist["test_x"][:4]
    program = lowering.to_edge_transform_and_lower(
        torch.export.export(module, (), {"x": x}), partitioner=[XnnpackPartitioner()]
    ).to_executorch()
    path = tmp_path / "snn.pte"
    path.write_bytes(program.buffer)
    method = Runtime.get().load_program(str(path)).load_method("forward")
    runtime = [np.asarray(t) for t in method.execute([x])]
    with torch.no_grad():
        reference = module(x=x)
    assert _spike_agreement(runtime, reference) >= 0.999
    assert (runtime[0].argmax(-1) == reference[0].numpy().argmax(-1)).all()


def test_resnet_unrolled_and_onnxruntime_match_torch(tiny_resnet, fmnist, tmp_path) -> None:
    net = convert(tiny_resnet, fmnist["train_x"][:64], timesteps=2)
    x = fmnist["test_x"][:64]
    module = named_input(UnrolledSNN(net, return_spikes=True), "x").eval()
    with torch.no_grad():
        logits, spikes = net(x, return_spikes=True)
        reference = module(x=x)
    torch.testing.assert_close(reference[0], logits, rtol=0, atol=1e-5)
    assert len(spikes) == 5 and all(torch.equal(a, b) for a, b in zip(reference[1:], spikes, strict=True))
    path = tmp_path / "resnet-snn.onnx"
    torch.onnx.export(
        module, (), kwargs={"x": x[:2]}, f=str(path), dynamo=True, opset_version=21,
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, verbose=False,
    )  # fmt: skip
    runtime = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
    assert _spike_agreement(runtime, reference) >= 0.999
    assert (runtime[0].argmax(-1) == reference[0].numpy().argmax(-1)).mean() >= 0.98
