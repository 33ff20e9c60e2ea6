"""Roofline latency and energy per inference, from a device profile and an op summary.

Per op: time = max(flops / peak[dtype], bytes / bandwidth) + launches x per-op overhead;
energy = flops / 2 x pJ per MAC[dtype] + bytes x pJ per byte. An op the device cannot run is
costed on the profile's host CPU (flagged), or left out (flagged) when there is no host or
``fallback=False``. It is a lower bound on time: peak throughput, compute and memory traffic
fully overlapped, and OpStat totals treated as one op (max of sums <= sum of maxes). Energy
counts the datapath and memory traffic the profile prices, not idle or static power.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from edgekit.devices.check import host_stat, judge
from edgekit.devices.ops import OpStat
from edgekit.devices.profile import DeviceProfile, load_profile

PJ_TO_MJ = 1e-9


@dataclass
class OpCost:
    op_type: str
    op_class: str
    count: int
    where: str  # device | host | excluded
    unit: str | None  # profile that runs it
    runs_as: str | None  # dtype it is costed at
    flops: float
    bytes_moved: float
    compute_ms: float
    memory_ms: float
    overhead_ms: float
    latency_ms: float
    energy_mj: float
    bound: str  # compute | memory | none
    note: str


@dataclass
class ClassCost:
    count: int = 0
    flops: float = 0.0
    bytes_moved: float = 0.0
    latency_ms: float = 0.0
    energy_mj: float = 0.0


@dataclass
class CostEstimate:
    device: str
    host: str | None
    latency_ms: float  # per inference, device and host ops together, excluded ops left out
    energy_mj: float
    ops: list[OpCost]
    by_class: dict[str, ClassCost]
    on_host: list[str]  # op types costed on the host CPU
    excluded: list[str]  # op types left out of the totals
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def rows(self) -> list[tuple[str, ...]]:
        """Per-class breakdown, header first, then a total row."""
        rows: list[tuple[str, ...]] = [("class", "ops", "GFLOP", "MB moved", "latency ms", "energy mJ")]
        for name, c in sorted(self.by_class.items(), key=lambda kv: -kv[1].latency_ms):
            rows.append(
                (
                    name,
                    str(c.count),
                    f"{c.flops / 1e9:.3f}",
                    f"{c.bytes_moved / 1e6:.3f}",
                    f"{c.latency_ms:.4f}",
                    f"{c.energy_mj:.4f}",
                )
            )
        total_flops = sum(c.flops for c in self.by_class.values())
        total_bytes = sum(c.bytes_moved for c in self.by_class.values())
        rows.append(
            (
                "total",
                str(sum(c.count for c in self.by_class.values())),
                f"{total_flops / 1e9:.3f}",
                f"{total_bytes / 1e6:.3f}",
                f"{self.latency_ms:.4f}",
                f"{self.energy_mj:.4f}",
            )
        )
        return rows

    def summary(self) -> list[tuple[str, str]]:
        return [
            ("device", self.device + (f" (host {self.host})" if self.host else "")),
            ("latency (roofline lower bound)", f"{self.latency_ms:.4f} ms"),
            ("energy", f"{self.energy_mj:.4f} mJ"),
            ("costed on host CPU", ", ".join(self.on_host) or "none"),
            ("left out", ", ".join(self.excluded) or "none"),
        ]


def _resolve(table: dict[str, float], dtype: str) -> tuple[str, bool]:
    """The table key to price ``dtype`` at: itself, else the next wider integer, else the slowest entry."""
    if dtype in table:
        return dtype, True
    if dtype.startswith("int"):
        wider = sorted((int(k[3:]), k) for k in table if k.startswith("int") and int(k[3:]) > int(dtype[3:]))
        if wider:
            return wider[0][1], False
    return min(table, key=table.__getitem__), False


def _cost(op: OpStat, unit: DeviceProfile, dtype: str) -> tuple[float, float, float, float, str, str]:
    peak_key, exact = _resolve(unit.peak_tops, dtype)
    energy_key, _ = _resolve(unit.pj_per_mac, dtype)
    compute_s = op.flops / (unit.peak_tops[peak_key] * 1e12) if op.flops else 0.0
    memory_s = op.bytes_moved / (unit.bandwidth_gbps * 1e9)
    overhead_s = op.count * unit.op_overhead_us * 1e-6
    energy = (op.flops / 2 * unit.pj_per_mac[energy_key] + op.bytes_moved * unit.pj_per_byte) * PJ_TO_MJ
    bound = "none" if compute_s == memory_s == 0 else ("compute" if compute_s >= memory_s else "memory")
    note = "" if exact or not op.flops else f"no {dtype} figure on {unit.name}: priced at {peak_key}"
    return compute_s * 1e3, memory_s * 1e3, overhead_s * 1e3, energy, bound, note


def estimate(op_stats: list[OpStat], profile: DeviceProfile | str, *, fallback: bool = True) -> CostEstimate:
    """Latency (ms) and energy (mJ) of one inference, with a per-op and per-class breakdown.

    ``op_stats`` flops and bytes are totals over each summary's ``count`` nodes.
    ``fallback=False`` leaves out (and lists) ops the device cannot run instead of costing them
    on the host CPU.
    """
    if isinstance(profile, str):
        profile = load_profile(profile)
    host = load_profile(profile.host) if profile.host and fallback else None
    costs: list[OpCost] = []
    for op in op_stats:
        verdict = judge(op, profile)
        unit, dtype, where, note = profile, verdict.runs_as, "device", ""
        if not verdict.accepted:
            host_verdict = judge(host_stat(verdict), host) if host else None
            if host and host_verdict and host_verdict.accepted:
                unit, dtype, where = host, host_verdict.runs_as, "host"
                note = f"{verdict.status} on {profile.name} ({verdict.reason}); costed on {host.name}"
            else:
                if not profile.host:
                    why = "no host CPU in the profile"
                else:
                    why = "no fallback requested" if not fallback else f"{profile.host} cannot run it either"
                costs.append(
                    OpCost(
                        op.op_type,
                        verdict.op_class,
                        op.count,
                        "excluded",
                        None,
                        None,
                        op.flops,
                        op.bytes_moved,
                        0.0,
                        0.0,
                        0.0,
                        0.0,
                        0.0,
                        "none",
                        f"{verdict.status}: {verdict.reason}; left out ({why})",
                    )
                )
                continue
        assert dtype is not None
        compute_ms, memory_ms, overhead_ms, energy, bound, price_note = _cost(op, unit, dtype)
        costs.append(
            OpCost(
                op.op_type,
                verdict.op_class,
                op.count,
                where,
                unit.name,
                dtype,
                op.flops,
                op.bytes_moved,
                compute_ms,
                memory_ms,
                overhead_ms,
                max(compute_ms, memory_ms) + overhead_ms,
                energy,
                bound,
                "; ".join(n for n in (note, price_note) if n),
            )
        )

    by_class: dict[str, ClassCost] = {}
    for c in costs:
        if c.where == "excluded":
            continue
        entry = by_class.setdefault(c.op_class, ClassCost())
        entry.count += c.count
        entry.flops += c.flops
        entry.bytes_moved += c.bytes_moved
        entry.latency_ms += c.latency_ms
        entry.energy_mj += c.energy_mj
    notes = ["roofline lower bound: peak throughput, compute and memory traffic fully overlapped"]
    if any(c.where == "host" for c in costs):
        notes.append("host fallback ops are costed on the host alone; transfers between units are not priced")
    return CostEstimate(
        device=profile.name,
        host=host.name if host else None,
        latency_ms=sum(c.latency_ms for c in costs),
        energy_mj=sum(c.energy_mj for c in costs),
        ops=costs,
        by_class=by_class,
        on_host=sorted({c.op_type for c in costs if c.where == "host"}),
        excluded=sorted({c.op_type for c in costs if c.where == "excluded"}),
        notes=notes,
    )
