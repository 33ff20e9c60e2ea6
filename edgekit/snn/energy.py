"""Synaptic operations and energy of an SNN against its ANN, counted the paper's way.

The ANN does one multiply-accumulate (MAC) per synapse. A spiking layer fed binary spikes does
an accumulate (AC) only where a spike arrived: spike rate x fan-out, which over a whole layer is
(fraction of inputs that spiked) x the layer's MACs, per timestep. Average pooling between a LIF
layer and a weight layer is linear and folds into the weights (a pooled conv is a strided conv on
the spike map with weights / area), so each spike still costs one AC per synapse it reaches:
spikes-per-input (pooled value x pool area) x MACs. The first layer sees the analog image
(direct encoding) and stays MACs; it is computed once because the input does not change across
timesteps. Energy uses the
45 nm figures the paper uses: MAC 4.6 pJ, AC 0.9 pJ (Horowitz, ISSCC 2014).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from edgekit.snn.network import SpikingNet, first_weight_index

MAC_PJ = 4.6
AC_PJ = 0.9


@dataclass
class LayerCount:
    index: int
    kind: str
    ann_macs: int  # per sample
    snn_macs: float  # per sample, over all timesteps
    snn_acs: float
    input_density: float  # mean fraction of non-zero inputs per timestep
    spike_rate: float | None = None  # of the LIF layer that follows, spikes per neuron per timestep


@dataclass
class OpCount:
    timesteps: int
    samples: int
    layers: list[LayerCount] = field(default_factory=list)
    spike_rates: list[float] = field(default_factory=list)  # per LIF layer, per neuron per timestep

    @property
    def ann_macs(self) -> float:
        return float(sum(layer.ann_macs for layer in self.layers))

    @property
    def snn_macs(self) -> float:
        return float(sum(layer.snn_macs for layer in self.layers))

    @property
    def snn_acs(self) -> float:
        return float(sum(layer.snn_acs for layer in self.layers))

    @property
    def ann_energy_pj(self) -> float:
        return self.ann_macs * MAC_PJ

    @property
    def snn_energy_pj(self) -> float:
        return self.snn_macs * MAC_PJ + self.snn_acs * AC_PJ

    @property
    def energy_ratio(self) -> float:
        """ANN energy / SNN energy: how many times less the SNN spends."""
        return self.ann_energy_pj / self.snn_energy_pj if self.snn_energy_pj else float("inf")

    def as_dict(self) -> dict:
        return {
            "timesteps": self.timesteps,
            "samples": self.samples,
            "mac_pj": MAC_PJ,
            "ac_pj": AC_PJ,
            "ann_macs": self.ann_macs,
            "snn_macs": self.snn_macs,
            "snn_acs": self.snn_acs,
            "ann_energy_nj": self.ann_energy_pj / 1e3,
            "snn_energy_nj": self.snn_energy_pj / 1e3,
            "energy_ratio": self.energy_ratio,
            "spike_rates": self.spike_rates,
            "layers": [asdict(layer) for layer in self.layers],
        }


@torch.no_grad()
def count_ops(net: SpikingNet, inputs: torch.Tensor, batch: int = 250) -> OpCount:
    """Run ``net`` (eval) on ``inputs`` and count its operations per sample, and the ANN's."""
    was_training = net.training
    net.eval()
    records: list[dict] = []
    for start in range(0, len(inputs), batch):
        net.record = []
        net(inputs[start : start + batch])
        records.extend(net.record)
    net.record = None
    net.train(was_training)
    steps, samples = net.timesteps, len(inputs)
    by_index: dict[int, list[dict]] = {}
    for entry in records:
        by_index.setdefault(entry["index"], []).append(entry)
    count = OpCount(timesteps=steps, samples=samples)
    first = first_weight_index(net.ops)
    rates: dict[int, float] = {}
    for index, entries in sorted(by_index.items()):
        weight = sum(e["batch"] for e in entries)
        if "spike_rate" in entries[0]:
            rates[index] = sum(e["spike_rate"] * e["batch"] for e in entries) / weight
            continue
        macs = entries[0]["macs"]
        density = sum(e["input_density"] * e["batch"] for e in entries) / weight  # per sample-step
        executed_steps = weight / samples  # 1 for the first layer (computed once), T for the rest
        analog = index == first or not all(e["spike_input"] for e in entries)
        if analog:
            # direct-encoded image (or an input that is not spike counts): multiply-accumulates
            snn_macs = macs * executed_steps if index == first else density * macs * executed_steps
            snn_acs = 0.0
        else:
            # every input spike is one accumulate per synapse it fans out to
            events = sum(e["spikes_per_input"] * e["batch"] for e in entries) / weight
            snn_macs, snn_acs = 0.0, events * macs * executed_steps
        count.layers.append(
            LayerCount(
                index=index,
                kind=entries[0]["kind"],
                ann_macs=macs,
                snn_macs=snn_macs,
                snn_acs=snn_acs,
                input_density=density,
            )
        )
    for layer in count.layers:
        following = [i for i in rates if i > layer.index]
        if following and (next_layer := min(following)) < min(
            [other.index for other in count.layers if other.index > layer.index] or [10**9]
        ):
            layer.spike_rate = rates[next_layer]
    count.spike_rates = [rates[i] for i in sorted(rates)]
    return count
