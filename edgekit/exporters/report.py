"""report.json, report.md and report.png of a bundle: what was exported and how good it is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgekit.runtime.manifest import Manifest


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        if value == float("inf"):
            return "inf"
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.3e}"
    return "-" if value is None else str(value)


def summary_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per format: the figures a user compares first (also printed by the CLI)."""
    rows = [
        (
            "format",
            "size MB",
            "size ×fp32",
            "latency ms",
            "latency ×fp32",
            "quality float → export",
            "SQNR dB vs sim",
            "device check",
            "int coverage",
            "est. device ms / mJ",
        )
    ]
    for fmt, entry in report["formats"].items():
        quality = entry.get("quality") or {}
        metric = quality.get("metric", "")
        quality_text = f"{metric} {_fmt(quality.get('float'))} → {_fmt(quality.get('export'))}" if metric else "-"
        check = entry["device_check"]
        cost = entry["cost_estimate"]
        rows.append(
            (
                fmt,
                f"{entry['bytes'] / 1e6:.2f}",
                _fmt(entry.get("size_ratio")),
                f"{entry['latency_ms']:.3f}",
                _fmt(entry.get("latency_ratio")),
                quality_text,
                _fmt(entry["verification"]["runtime_vs_simulated"]["sqnr_db"]),
                "pass" if check.get("passed") else "FAIL",
                _fmt(check.get("integer_coverage_flops")),
                f"{_fmt(cost.get('latency_ms'))} / {_fmt(cost.get('energy_mj'))}",
            )
        )
    return rows


def _markdown_table(rows: list[tuple[str, ...]]) -> str:
    header, *body = rows
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _op_rows(entry: dict[str, Any]) -> list[tuple[str, ...]]:
    """The device check's per-op verdicts: op, count, integer or float as exported, and whether it runs."""
    rows = [("op", "class", "count", "exported as", "device needs", "verdict", "why")]
    for op in entry["device_check"]["ops"]:
        rows.append(
            (op["op_type"], op["op_class"], str(op["count"]), op["dtype"], op["required"], op["status"], op["reason"])
        )
    return rows


def _plot(directory: Path, report: dict[str, Any]) -> str | None:
    formats = report["formats"]
    if not any("baseline" in entry for entry in formats.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(formats)
    figure, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for axis, key, label in ((axes[0], "size_ratio", "file size ÷ fp32"), (axes[1], "latency_ratio", "latency ÷ fp32")):
        values = [formats[name].get(key, 1.0) for name in names]
        axis.bar(names, values, color=["#4c72b0", "#dd8452"][: len(names)])
        axis.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        axis.set_title(label)
        for index, value in enumerate(values):
            axis.text(index, value, f"{value:.2f}×", ha="center", va="bottom")
    figure.suptitle(f"{report['plan']['model']} · {report['plan']['recipe']['name']} vs fp32 (measured here)")
    figure.tight_layout()
    figure.savefig(directory / "report.png", dpi=110)
    plt.close(figure)
    return "report.png"


def snn_section(directory: Path, snn: dict[str, Any]) -> list[str]:
    """report.md lines for a spiking bundle, and ``snn.png`` (accuracy against timesteps) beside it.

    The energy claim is the point of an SNN, so the report shows where it comes from: each layer's
    spike rate and its MACs (ANN) against accumulates (SNN) at the 45 nm costs.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = snn["ops"]
    ladder = sorted(int(t) for t in snn["stage_accuracy"])
    converted = sorted(int(t) for t in snn["conversion_accuracy"])
    figure, axis = plt.subplots(figsize=(5, 3.2))
    axis.axhline(100 * snn["ann_accuracy"], color="grey", linestyle="--", label="ANN")
    axis.plot(ladder, [100 * snn["stage_accuracy"][str(t)] for t in ladder], "o-", label="IIR (retrained)")
    axis.plot(converted, [100 * snn["conversion_accuracy"][str(t)] for t in converted], "s:", label="conversion only")
    axis.set_xlabel("timesteps T")
    axis.set_ylabel(f"accuracy % ({snn['eval_samples']} samples)")
    axis.set_xticks(sorted(set(ladder) | set(converted)))
    axis.legend()
    figure.tight_layout()
    figure.savefig(directory / "snn.png", dpi=110)
    plt.close(figure)
    rows = [("layer", "kind", "spike rate", "ANN MACs", "SNN MACs", "SNN ACs")]
    rows += [
        (
            str(layer["index"]),
            layer["kind"],
            _fmt(layer["spike_rate"]),
            _fmt(layer["ann_macs"]),
            _fmt(layer["snn_macs"]),
            _fmt(layer["snn_acs"]),
        )
        for layer in ops["layers"]
    ]
    stages = ", ".join(f"T={t} {100 * snn['stage_accuracy'][str(t)]:.2f}%" for t in reversed(ladder))
    return [
        "## Spiking network",
        "",
        f"- accuracy: ANN {100 * snn['ann_accuracy']:.2f}%; IIR {stages}; exported T={snn['timesteps']}",
        f"- energy per inference at 45 nm (MAC {ops['mac_pj']} pJ, AC {ops['ac_pj']} pJ): ANN "
        f"{_fmt(ops['ann_energy_nj'])} nJ, SNN {_fmt(ops['snn_energy_nj'])} nJ ({_fmt(ops['energy_ratio'])}x lower); "
        "the device profile's estimate is in the summary",
        "",
        _markdown_table(rows),
        "",
        "![accuracy against timesteps](snn.png)",
        "",
    ]


def write_report(directory: Path, manifest: Manifest, report: dict[str, Any]) -> None:
    plot = _plot(directory, report)
    (directory / "report.json").write_text(json.dumps(report, indent=2, default=str))
    lines = [
        f"# edgekit export: {manifest.model['spec']}",
        "",
        f"- recipe: `{manifest.recipe['name']}` (transform `{manifest.recipe['transform']}`)",
        f"- device profile: `{manifest.device}`",
        f"- created: {manifest.created} with edgekit {manifest.edgekit_version}",
        "",
        "## Summary",
        "",
        _markdown_table(summary_rows(report)),
        "",
        "Latency is measured on this machine in the format's real runtime, against an fp32 export of the same",
        "model in the same process; device figures are the profile's roofline estimate.",
        "",
    ]
    if plot:
        lines += [f"![size and latency against fp32]({plot})", ""]
    if "snn" in report:
        lines += snn_section(directory, report["snn"])
    for fmt, entry in report["formats"].items():
        verification = entry["verification"]
        lines += [f"## {fmt}", "", "Verification on sample inputs:", ""]
        for pair in ("runtime_vs_simulated", "runtime_vs_float", "simulated_vs_float"):
            metrics = ", ".join(f"{k} {_fmt(v)}" for k, v in verification[pair].items())
            lines.append(f"- {pair.replace('_', ' ')}: {metrics}")
        check = entry["device_check"]
        reasons = check.get("reasons") or []
        lines += [
            "",
            f"Device check: **{'pass' if check.get('passed') else 'FAIL'}**"
            + (f" ({'; '.join(reasons)})" if reasons else ""),
            "",
        ]
        lines += [_markdown_table(_op_rows(entry)), ""]
    (directory / "report.md").write_text("\n".join(lines))
