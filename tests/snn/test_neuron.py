"""LIF dynamics against hand-computed sequences, and the surrogate gradient's values."""

from __future__ import annotations

import pytest
import torch

from edgekit.snn.neuron import LIF, SpikeFunction, spike, surrogate


def run(lif: LIF, currents: list[float]) -> tuple[list[float], list[float]]:
    u, spikes, potentials = None, [], []
    for current in currents:
        s, u = lif.step(torch.tensor([current]), u)
        spikes.append(float(s.detach()))
        potentials.append(round(float(u.detach()), 6))
    return spikes, potentials


def test_integrate_and_fire_soft_reset() -> None:
    # leak 1 (IF): 0.6 -> 1.2 fires, keeps 0.2 -> 0.8 -> 1.4 fires, keeps 0.4
    spikes, potentials = run(LIF(threshold=1.0), [0.6, 0.6, 0.6, 0.6])
    assert spikes == [0, 1, 0, 1]
    assert potentials == pytest.approx([0.6, 0.2, 0.8, 0.4])


def test_leaky_neuron_and_large_input() -> None:
    lif = LIF(threshold=1.0, leak=0.5)
    # u: 0.6; 0.3+0.6=0.9; 0.45+0.6=1.05 fires -> 0.05; 0.025+0.6=0.625
    spikes, potentials = run(lif, [0.6, 0.6, 0.6, 0.6])
    assert spikes == [0, 0, 1, 0]
    assert potentials == pytest.approx([0.6, 0.9, 0.05, 0.625])
    # soft reset keeps the excess: 2.5 fires once per step and carries 1.5 then 0.5 (leak 1)
    spikes, potentials = run(LIF(threshold=1.0), [2.5, 0.0, 0.0])
    assert spikes == [1, 1, 0] and potentials == pytest.approx([1.5, 0.5, 0.5])


def test_threshold_scales_and_exact_threshold_does_not_fire() -> None:
    spikes, _ = run(LIF(threshold=2.0), [2.0, 0.1, 1.0])  # u = 2.0 is not > V_th; 2.1 is
    assert spikes == [0, 1, 0]


def test_leak_is_clamped_to_one() -> None:
    lif = LIF(threshold=10.0, leak=1.5)
    _, potentials = run(lif, [1.0, 1.0])  # used as 1.0 even before constrain()
    assert potentials == pytest.approx([1.0, 2.0])
    with torch.no_grad():
        lif.threshold.fill_(-3.0)
    lif.constrain()
    assert lif.leak.item() == 1.0 and lif.threshold.item() > 0


def test_spike_is_the_papers_test() -> None:
    u = torch.randn(10_000) * 3
    threshold = torch.tensor(0.7)
    assert torch.equal(spike(u, threshold), (u / threshold - 1 > 0).float())


def test_surrogate_gradient_values() -> None:
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.25, 1.0, 1.5])
    assert surrogate(x).tolist() == pytest.approx([0, 0, 0.15, 0.3, 0.225, 0, 0])
    # through u and V_th: x = u/V_th - 1 with V_th = 2 -> x = -0.5, 0, 0.5
    u = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    threshold = torch.tensor(2.0, requires_grad=True)
    SpikeFunction.apply(u, threshold).sum().backward()
    assert u.grad.tolist() == pytest.approx([0.075, 0.15, 0.075])  # surrogate / V_th
    # dV_th = sum(surrogate * -u / V_th^2) = -(0.15*1 + 0.3*2 + 0.15*3) / 4
    assert threshold.grad.item() == pytest.approx(-0.3)


def test_reset_is_not_a_surrogate_path() -> None:
    lif = LIF(threshold=1.0)
    current = torch.tensor([1.2], requires_grad=True)
    _, u = lif.step(current, None)
    u.sum().backward()
    assert current.grad.item() == 1.0  # u - V_th * spike.detach(): only the identity path
    assert lif.threshold.grad.item() == -1.0  # the reset subtracts V_th where it fired
