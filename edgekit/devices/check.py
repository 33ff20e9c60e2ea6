"""Does an exported graph run on a device as exported? Per op, per format, and in memory.

Every decision comes from the profile's class rules: an op either runs as exported ("ok"), runs
but not in integer because the device has no integer kernel for it at that width ("dequantized":
the runtime computes it in float), cannot run in its dtype ("rejected"), or cannot run at all
("unsupported", "undelegated"). Float islands are reported, never silent.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from edgekit.devices.classes import UNKNOWN, is_compute, normalise, op_class
from edgekit.devices.ops import OpStat
from edgekit.devices.profile import FORMATS, DeviceProfile, int_dtype, load_profile
from edgekit.errors import EdgekitError

ACCEPTED = ("ok", "dequantized")


@dataclass
class OpVerdict:
    op_type: str
    op_class: str
    count: int
    integer: bool
    activation_bits: int | None
    weight_bits: int | None
    flops: float
    bytes_moved: float
    delegated: bool | None
    dtype: str  # as exported: "a8w8", "a16", "int", "float"
    required: str  # the device's rule for the class, in words
    status: str  # ok | dequantized | rejected | unsupported | undelegated
    runs_as: str | None  # dtype the device computes it in; None when it cannot run there
    reason: str

    @property
    def accepted(self) -> bool:
        return self.status in ACCEPTED

    @property
    def integer_run(self) -> bool:
        """Runs on the device in integer, at a width the device allows."""
        return self.status == "ok" and self.integer

    @property
    def compute(self) -> bool:
        return is_compute(self.op_class)


def exported_dtype(op: OpStat) -> str:
    if not op.integer:
        return "float" if op.weight_bits is None else f"float w{op.weight_bits}"
    if op.activation_bits is None:
        return "int" if op.weight_bits is None else f"int w{op.weight_bits}"
    return f"a{op.activation_bits}" + (f"w{op.weight_bits}" if op.weight_bits is not None else "")


def judge(op: OpStat, profile: DeviceProfile) -> OpVerdict:
    """The device's verdict on one op summary, from the profile's data only."""
    cls = op_class(op.op_type)
    rule = profile.rule(cls)

    def verdict(status: str, runs_as: str | None, reason: str) -> OpVerdict:
        return OpVerdict(
            op_type=op.op_type,
            op_class=cls,
            count=op.count,
            integer=op.integer,
            activation_bits=op.activation_bits,
            weight_bits=op.weight_bits,
            flops=op.flops,
            bytes_moved=op.bytes_moved,
            delegated=op.delegated,
            dtype=exported_dtype(op),
            required=rule.requirement() if rule else "not supported",
            status=status,
            runs_as=runs_as,
            reason=reason,
        )

    if op.op_type in profile.unsupported_ops or normalise(op.op_type) in profile.unsupported_ops:
        return verdict("unsupported", None, "listed as unsupported in the device profile")
    if cls == UNKNOWN:
        return verdict("unsupported", None, "op type not in edgekit's op class table")
    if rule is None:
        return verdict("unsupported", None, f"the device runs no {cls} ops")
    if profile.requires_delegation and op.delegated is False and is_compute(cls):
        return verdict("undelegated", None, "outside the backend delegate: it would run on the host CPU")
    float_dtype = rule.float[0] if rule.float else None
    if rule.any_dtype:
        runs_as = int_dtype(op.activation_bits, op.weight_bits) if op.integer else (float_dtype or "fp32")
        return verdict("ok", runs_as, "any dtype: the runtime folds or re-tags these ops")
    if not op.integer:
        if float_dtype:
            return verdict("ok", float_dtype, f"float, computed in {float_dtype}")
        return verdict("rejected", None, f"float {cls} is not executed here ({rule.requirement()})")
    problem = _integer_problem(op, rule.int_activation_bits, rule.int_weight_bits, cls)
    if problem is None:
        runs_as = int_dtype(op.activation_bits or min(rule.int_activation_bits), op.weight_bits)
        width = "" if op.activation_bits is not None else " (width not stated by the exporter)"
        return verdict("ok", runs_as, f"integer, computed in {runs_as}{width}")
    if float_dtype:
        why = f"{problem}; the runtime dequantizes it and computes in {float_dtype}"
        return verdict("dequantized", float_dtype, why)
    return verdict("rejected", None, f"{problem}; no float fallback on this unit")


def _integer_problem(op: OpStat, acts: tuple[int, ...], weights: tuple[int, ...], cls: str) -> str | None:
    if not acts:
        return f"no integer {cls} kernel"
    if op.activation_bits is not None and op.activation_bits not in acts:
        allowed = "|".join(f"a{b}" for b in acts)
        return f"{op.activation_bits}-bit activations not executed for {cls} (takes {allowed})"
    if op.weight_bits is not None and op.weight_bits not in weights:
        allowed = "|".join(f"w{b}" for b in weights)
        return f"{op.weight_bits}-bit weights not executed for {cls} (takes {allowed})"
    return None


@dataclass
class MemoryFit:
    model_bytes: int
    activation_bytes: int | None  # None: the exporter did not measure peak activations
    budget_bytes: int  # activations (and weights, when they share memory)
    weights_budget_bytes: int | None  # separate weight storage, if the device has one
    fits: bool
    reason: str


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def memory_fit(model_bytes: int, peak_activation_bytes: int | None, profile: DeviceProfile) -> MemoryFit:
    acts = peak_activation_bytes
    act_text = "activations not measured" if acts is None else f"activations {human_bytes(acts)}"
    if profile.weights_capacity_bytes is not None:
        weights_ok = model_bytes <= profile.weights_capacity_bytes
        acts_ok = acts is None or acts <= profile.usable_bytes
        reason = (
            f"model {human_bytes(model_bytes)} {'<=' if weights_ok else '>'} "
            f"{human_bytes(profile.weights_capacity_bytes)} weight storage; {act_text}"
        )
        if acts is not None:
            reason += f" {'<=' if acts_ok else '>'} {human_bytes(profile.usable_bytes)} working memory"
        return MemoryFit(
            model_bytes,
            acts,
            profile.usable_bytes,
            profile.weights_capacity_bytes,
            weights_ok and acts_ok,
            reason,
        )
    need = model_bytes + (acts or 0)
    fits = need <= profile.usable_bytes
    reason = (
        f"model {human_bytes(model_bytes)} + {act_text} = {human_bytes(need)} "
        f"{'<=' if fits else '>'} {human_bytes(profile.usable_bytes)} usable"
    )
    return MemoryFit(model_bytes, acts, profile.usable_bytes, None, fits, reason)


@dataclass
class DeviceCheck:
    device: str
    runtime: str
    fmt: str
    format_ok: bool
    ops: list[OpVerdict]
    memory: MemoryFit
    integer_coverage_count: float | None  # share of compute ops (by count) running in allowed integer
    integer_coverage_flops: float | None  # the same, weighted by FLOPs
    unsupported: list[str]  # op types that cannot run on the device at all
    rejected: list[str]  # op types that cannot run in their exported dtype
    dequantized: list[str]  # integer in the export, float on the device
    fallback: list[str]  # non-accepted op types the host CPU would run (allow_fallback)
    passed: bool
    reasons: list[str] = field(default_factory=list)  # why it failed
    warnings: list[str] = field(default_factory=list)  # what passes but is worth reading

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for row, op in zip(data["ops"], self.ops, strict=True):
            row["accepted"] = op.accepted
            row["integer_run"] = op.integer_run
        return data

    def rows(self) -> list[tuple[str, ...]]:
        """Per-op table, header first: what a CLI prints and report.md renders."""
        rows: list[tuple[str, ...]] = [("op", "class", "count", "exported", "device needs", "verdict", "why")]
        for op in self.ops:
            rows.append((op.op_type, op.op_class, str(op.count), op.dtype, op.required, op.status, op.reason))
        return rows

    def summary(self) -> list[tuple[str, str]]:
        """Headline facts as (label, value) pairs."""

        def pct(x: float | None) -> str:
            return "n/a (no compute ops)" if x is None else f"{100 * x:.1f}%"

        return [
            ("device", f"{self.device} ({self.runtime})"),
            ("format", f"{self.fmt}: {'accepted' if self.format_ok else 'NOT accepted'}"),
            (
                "integer coverage",
                f"{pct(self.integer_coverage_count)} of compute ops, {pct(self.integer_coverage_flops)} of FLOPs",
            ),
            ("unsupported ops", ", ".join(self.unsupported) or "none"),
            ("ops rejected in their dtype", ", ".join(self.rejected) or "none"),
            ("float islands (dequantized)", ", ".join(self.dequantized) or "none"),
            ("memory", self.memory.reason),
            ("verdict", "PASS" if self.passed else "FAIL: " + "; ".join(self.reasons)),
        ]


def _names(verdicts: list[OpVerdict]) -> list[str]:
    totals: dict[str, int] = {}
    for op in verdicts:
        totals[op.op_type] = totals.get(op.op_type, 0) + op.count
    return [f"{name} x{count}" for name, count in totals.items()]


def check(
    op_stats: list[OpStat],
    model_bytes: int,
    peak_activation_bytes: int | None,
    profile: DeviceProfile | str,
    fmt: str,
    *,
    allow_fallback: bool = False,
) -> DeviceCheck:
    """Check an exported graph (its per-op summary and sizes) against a device profile.

    ``allow_fallback``: ops the device cannot run count as warnings, not failures, when the
    profile names a host CPU that can run them (onnxruntime and ExecuTorch both fall back so).
    """
    if isinstance(profile, str):
        profile = load_profile(profile)
    if fmt not in FORMATS:
        raise EdgekitError(f"unknown model format '{fmt}'; known: {', '.join(FORMATS)}")
    verdicts = [judge(op, profile) for op in op_stats]
    reasons: list[str] = []
    warnings: list[str] = []

    format_ok = fmt in profile.formats
    if not format_ok:
        reasons.append(f"format '{fmt}' is not accepted (accepts {', '.join(profile.formats)})")

    blocked = [op for op in verdicts if not op.accepted]
    host_runs: list[OpVerdict] = []
    if allow_fallback and profile.host and blocked:
        host = load_profile(profile.host)
        host_runs = [op for op in blocked if judge(host_stat(op), host).accepted]
        if host_runs:
            warnings.append(f"falls back to host {host.name}: " + ", ".join(_names(host_runs)))
    on_host = {id(op) for op in host_runs}
    unsupported = [op for op in verdicts if op.status in ("unsupported", "undelegated")]
    rejected = [op for op in verdicts if op.status == "rejected"]
    for label, group in (("unsupported", unsupported), ("rejected in their dtype", rejected)):
        bad = [op for op in group if id(op) not in on_host]
        if bad:
            detail = ", ".join(f"{op.op_type} x{op.count} ({op.reason})" for op in bad)
            reasons.append(f"ops {label}: {detail}")
    dequantized = [op for op in verdicts if op.status == "dequantized"]
    if dequantized:
        warnings.append("integer in the export but computed in float here: " + ", ".join(_names(dequantized)))

    memory = memory_fit(model_bytes, peak_activation_bytes, profile)
    if not memory.fits:
        reasons.append(f"does not fit in memory: {memory.reason}")

    compute = [op for op in verdicts if op.compute]
    total_count = sum(op.count for op in compute)
    total_flops = sum(op.flops for op in compute)
    int_count = sum(op.count for op in compute if op.integer_run)
    int_flops = sum(op.flops for op in compute if op.integer_run)
    return DeviceCheck(
        device=profile.name,
        runtime=profile.runtime,
        fmt=fmt,
        format_ok=format_ok,
        ops=verdicts,
        memory=memory,
        integer_coverage_count=int_count / total_count if total_count else None,
        integer_coverage_flops=int_flops / total_flops if total_flops else None,
        unsupported=_names(unsupported),
        rejected=_names(rejected),
        dequantized=_names(dequantized),
        fallback=_names(host_runs),
        passed=not reasons,
        reasons=reasons,
        warnings=warnings,
    )


def host_stat(op: OpVerdict) -> OpStat:
    """The op as the host CPU sees it when it falls back there: same dtypes, no delegate question."""
    return OpStat(op.op_type, op.count, op.integer, op.activation_bits, op.weight_bits, op.flops, op.bytes_moved, None)
