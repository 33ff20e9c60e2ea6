"""Op/energy counting on hand-built nets with known spikes, and the IIR ladder on a tiny net."""

from __future__ import annotations

import pytest
import torch
from snn_tiny import accuracy
from torch import nn

from edgekit.errors import EdgekitError
from edgekit.snn.convert import convert
from edgekit.snn.energy import AC_PJ, MAC_PJ, count_ops
from edgekit.snn.network import SpikingNet
from edgekit.snn.neuron import LIF
from edgekit.snn.train import iir


def _linear(weight: list[list[float]]) -> nn.Linear:
    layer = nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.zero_()
    return layer


def test_count_ops_by_hand() -> None:
    # x = [1,0,0,0] drives currents [2, 0.6, 2] -> spikes [1, 0, 1] (V_th 1) -> readout 3 -> 2
    first = _linear([[2, 0, 0, 0], [0.6, 0, 0, 0], [2, 0, 0, 0]])
    net = SpikingNet([first, LIF(1.0), _linear([[1, 1, 1], [1, 0, 1]])], timesteps=1)
    count = count_ops(net, torch.tensor([[1.0, 0, 0, 0]]))
    assert count.ann_macs == 12 + 6
    assert count.snn_macs == 12  # the analog first layer
    assert count.snn_acs == pytest.approx(6 * 2 / 3)  # 2 spikes x fan-out 2
    assert count.spike_rates == pytest.approx([2 / 3])
    assert count.energy_ratio == pytest.approx(18 * MAC_PJ / (12 * MAC_PJ + 4 * AC_PJ))
    # T=2: after the reset u = [1, 0.6, 1]; the same currents again give [3, 1.2, 3] -> spikes [1, 1, 1]
    net.timesteps = 2
    count = count_ops(net, torch.tensor([[1.0, 0, 0, 0]]))
    assert count.snn_macs == 12  # the first layer still runs once
    assert count.snn_acs == pytest.approx(2 * 2 + 3 * 2)
    assert count.spike_rates == pytest.approx([5 / 6])


def test_count_ops_through_average_pooling() -> None:
    # two of four spikes pooled to 0.5: still 2 events, each one accumulate per synapse reached
    conv = nn.Conv2d(1, 1, 1)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.zero_()
    ops = [conv, LIF(0.5), nn.AvgPool2d(2), nn.Flatten(), _linear([[1.0], [2.0], [3.0]])]
    count = count_ops(SpikingNet(ops, timesteps=1), torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]]))
    assert count.layers[1].snn_acs == pytest.approx(2 * 3)
    assert count.layers[1].snn_macs == 0


def test_iir_ladder_recovers_t1_accuracy(tiny_ann, fmnist) -> None:
    x, y = fmnist["train_x"], fmnist["train_y"]
    test_x, test_y = fmnist["test_x"][:500], fmnist["test_y"][:500]
    net = convert(tiny_ann, x[:64], timesteps=3, dropout=0.2)
    net.timesteps = 1
    converted_t1 = accuracy(net, test_x, test_y)
    stages, kept = iir(net, x, y, [3, 1], 0.5, 1e-2, 64, test_x, test_y, show_progress=False, keep=(3,))
    assert [stage.timesteps for stage in stages] == [3, 1] and net.timesteps == 1
    assert kept[3].timesteps == 3 and kept[3] is not net
    assert stages[-1].accuracy > converted_t1 + 0.3  # conversion alone is near chance at T=1
    assert stages[-1].accuracy == pytest.approx(accuracy(net, test_x, test_y))
    assert all(leak <= 1.0 for leak in stages[-1].leaks) and all(t > 0 for t in stages[-1].thresholds)
    with pytest.raises(EdgekitError, match="decreasing"):
        iir(net, x, y, [1, 3], 1, 1e-3, 64, test_x, test_y, show_progress=False)
