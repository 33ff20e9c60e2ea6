"""Device profiles: TOML files under ``profiles/`` read into :class:`DeviceProfile`, strictly.

A profile is data the check and the cost model read; nothing in edgekit branches on a device's
name. Every figure in a profile carries a ``<key>_source`` string naming where it comes from (a
datasheet, a vendor page, a paper, or ``estimate: <basis>``); the loader refuses a figure without
one, so ``edgekit devices show`` can always print the evidence next to the number.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from edgekit.devices.classes import op_classes
from edgekit.errors import EdgekitError

# model file formats a profile may accept
FORMATS: dict[str, str] = {
    "onnx": "ONNX graph (float or QDQ) for onnxruntime",
    "onnx-qdq": "ONNX graph whose integer ops sit between QuantizeLinear/DequantizeLinear pairs",
    "pte": "ExecuTorch program (.pte), ops delegated to the profile's backend",
    "tflite": "TensorFlow Lite flatbuffer (not written by edgekit; listed for completeness)",
    "mlpackage": "Core ML model package (not written by edgekit; listed for completeness)",
}
# dtypes a unit computes in; keys of compute.peak_tops and energy.pj_per_mac
DTYPES = ("int4", "int8", "int16", "fp16", "bf16", "fp32")
FLOAT_DTYPES = ("fp16", "bf16", "fp32")
ACTIVATION_BITS = (8, 16)
WEIGHT_BITS = (4, 8, 16)


@dataclass(frozen=True)
class ClassRule:
    """What one op class may be on a device: integer widths, float precisions, or anything."""

    int_activation_bits: tuple[int, ...]  # () = the unit runs no integer op of this class
    int_weight_bits: tuple[int, ...]  # widths for constant (weight) inputs
    float: tuple[str, ...]  # float precisions it executes, first = the one it uses; () = none
    any_dtype: bool  # dtype rules do not apply (the runtime folds or re-tags these ops)
    source: str

    def compute_dtypes(self) -> set[str]:
        """Every dtype an accepted op of this class computes in (keys the peak/energy tables need)."""
        weights = self.int_weight_bits or (None,)
        dtypes = {int_dtype(a, w) for a in self.int_activation_bits for w in weights}
        return dtypes | set(self.float)

    def requirement(self) -> str:
        """The rule in a few words, e.g. "int a8|a16 w4|w8; no float"."""
        if self.any_dtype:
            return "any dtype"
        parts = []
        if self.int_activation_bits:
            acts = "|".join(f"a{b}" for b in self.int_activation_bits)
            weights = "|".join(f"w{b}" for b in self.int_weight_bits)
            parts.append(f"int {acts} {weights}".rstrip())
        else:
            parts.append("no integer")
        parts.append(f"float as {self.float[0]}" if self.float else "no float")
        return "; ".join(parts)


def int_dtype(activation_bits: int | None, weight_bits: int | None) -> str:
    """Integer width a MAC runs at: the wider operand, never below 8 (4-bit weights unpack to 8)."""
    return f"int{max(activation_bits or 8, weight_bits or 0, 8)}"


@dataclass
class DeviceProfile:
    name: str
    description: str
    vendor: str
    runtime: str
    formats: tuple[str, ...]
    host: str | None  # profile that unsupported / float ops fall back to
    requires_delegation: bool  # ExecuTorch: an op outside the delegate runs on the host
    unsupported_ops: tuple[str, ...]
    peak_tops: dict[str, float]  # dtype -> 1e12 ops/s (a MAC is 2 ops)
    op_overhead_us: float  # fixed cost per op launch
    capacity_bytes: int
    usable_bytes: int  # what one model may take (capacity minus what the OS keeps)
    weights_capacity_bytes: int | None  # separate weight storage (flash), if any
    bandwidth_gbps: float  # 1e9 bytes/s
    pj_per_mac: dict[str, float]  # dtype -> picojoule per multiply-accumulate
    pj_per_byte: float  # picojoule per byte of memory traffic
    classes: dict[str, ClassRule]
    sources: dict[str, str]  # dotted key -> where the figure comes from
    path: str
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    def rule(self, class_name: str) -> ClassRule | None:
        return self.classes.get(class_name)

    def rows(self) -> list[tuple[str, str, str]]:
        """Every field as (key, value, source), in file order: what ``edgekit devices show`` prints."""
        rows: list[tuple[str, str, str]] = []

        def walk(table: dict[str, Any], prefix: str, inherited: str) -> None:
            for key, value in table.items():
                if key.endswith("_source") or (prefix.startswith("classes.") and key == "source"):
                    continue
                dotted = f"{prefix}{key}"
                if isinstance(value, dict) and not _is_number_table(value):
                    walk(value, f"{dotted}.", str(value.get("source", inherited)))
                    continue
                rows.append((dotted, _fmt(value, key), self.sources.get(dotted, inherited)))

        walk(self.raw, "", "")
        return rows

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "fields": [list(row) for row in self.rows()]}


def _is_number_table(value: dict[str, Any]) -> bool:
    return bool(value) and all(_is_number(v) for v in value.values())


def _fmt(value: Any, key: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) if value else "(none)"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v, k)}" for k, v in value.items())
    if key.endswith("_bytes") and isinstance(value, int):
        return f"{value} ({value / 2**20:.1f} MiB)" if value < 2**30 else f"{value} ({value / 2**30:.1f} GiB)"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


# ---- schema ------------------------------------------------------------------------------------
# kind: str | bool | int | num | strlist | intlist | numtable | table ; (kind, required, needs_source)
_TOP: dict[str, tuple[str, bool, bool]] = {
    "name": ("str", True, False),
    "description": ("str", True, False),
    "vendor": ("str", True, False),
    "runtime": ("str", True, True),
    "formats": ("strlist", True, False),
    "host": ("str", False, False),
    "requires_delegation": ("bool", False, False),
    "unsupported_ops": ("strlist", False, True),
    "compute": ("table", True, False),
    "memory": ("table", True, False),
    "energy": ("table", True, False),
    "classes": ("table", True, False),
}
_TABLES: dict[str, dict[str, tuple[str, bool, bool]]] = {
    "compute": {"peak_tops": ("numtable", True, True), "op_overhead_us": ("num", False, True)},
    "memory": {
        "kind": ("str", False, False),
        "capacity_bytes": ("int", True, True),
        "usable_bytes": ("int", False, True),
        "weights_capacity_bytes": ("int", False, True),
        "bandwidth_gbps": ("num", True, True),
    },
    "energy": {"pj_per_mac": ("numtable", True, True), "pj_per_byte": ("num", True, True)},
}
_CLASS: dict[str, tuple[str, bool, bool]] = {
    "int_activation_bits": ("intlist", True, False),
    "int_weight_bits": ("intlist", False, False),
    "float": ("strlist", True, False),
    "any_dtype": ("bool", False, False),
    "source": ("str", True, False),
}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _type_ok(kind: str, value: Any) -> bool:
    if kind == "str":
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "num":
        return _is_number(value)
    if kind == "strlist":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == "intlist":
        return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if kind == "numtable":
        return isinstance(value, dict) and all(_is_number(v) for v in value.values())
    return isinstance(value, dict)  # table


_KIND_WORDS = {
    "str": "a string",
    "bool": "true or false",
    "int": "an integer",
    "num": "a number",
    "strlist": "a list of strings",
    "intlist": "a list of integers",
    "numtable": "a table of numbers",
    "table": "a table",
}


class _Validator:
    def __init__(self, path: Path):
        self.where = f"device profile {path.name}"
        self.sources: dict[str, str] = {}

    def fail(self, message: str) -> EdgekitError:
        return EdgekitError(f"{self.where}: {message}")

    def table(self, data: dict[str, Any], schema: dict[str, tuple[str, bool, bool]], prefix: str) -> None:
        for key, value in data.items():
            dotted = f"{prefix}{key}"
            base = key.removesuffix("_source")
            if key.endswith("_source") and base in schema:
                if not isinstance(value, str) or not value.strip():
                    raise self.fail(f"key '{dotted}' must be a non-empty string")
                self.sources[f"{prefix}{base}"] = value
                continue
            if key not in schema:
                known = ", ".join(sorted(schema))
                raise self.fail(f"unknown key '{dotted}'; known: {known}")
            kind = schema[key][0]
            if not _type_ok(kind, value):
                raise self.fail(f"key '{dotted}' must be {_KIND_WORDS[kind]}, got {value!r}")
        for key, (_kind, required, needs_source) in schema.items():
            dotted = f"{prefix}{key}"
            if required and key not in data:
                raise self.fail(f"missing key '{dotted}'")
            if needs_source and key in data and f"{key}_source" not in data:
                raise self.fail(f"key '{dotted}' has no '{dotted}_source' (say where the figure comes from)")


def _parse(path: Path) -> DeviceProfile:
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise EdgekitError(f"device profile {path.name} is not valid TOML: {error}") from None
    except OSError as error:
        raise EdgekitError(f"cannot read device profile {path}: {error.strerror}") from None
    check = _Validator(path)
    check.table(data, _TOP, "")
    for name, schema in _TABLES.items():
        check.table(data[name], schema, f"{name}.")
    known_classes = op_classes()
    rules: dict[str, ClassRule] = {}
    for class_name, entry in data["classes"].items():
        if class_name not in known_classes:
            raise check.fail(f"unknown op class 'classes.{class_name}'; known: {', '.join(known_classes)}")
        if not isinstance(entry, dict):
            raise check.fail(f"key 'classes.{class_name}' must be a table")
        check.table(entry, _CLASS, f"classes.{class_name}.")
        rules[class_name] = _rule(check, class_name, entry)

    if data["name"] != path.stem:
        raise check.fail(f"key 'name' is {data['name']!r} but the file is {path.stem}.toml")
    for fmt in data["formats"]:
        if fmt not in FORMATS:
            raise check.fail(f"key 'formats' has unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    compute, memory, energy = data["compute"], data["memory"], data["energy"]
    dtype_tables = (("compute.peak_tops", compute["peak_tops"]), ("energy.pj_per_mac", energy["pj_per_mac"]))
    for key, table in dtype_tables:
        for dtype, value in table.items():
            if dtype not in DTYPES:
                raise check.fail(f"key '{key}.{dtype}' is not a dtype; known: {', '.join(DTYPES)}")
            if value < 0 or (key == "compute.peak_tops" and value == 0):
                raise check.fail(f"key '{key}.{dtype}' must be positive, got {value!r}")
    for key in ("capacity_bytes", "bandwidth_gbps"):
        if memory[key] <= 0:
            raise check.fail(f"key 'memory.{key}' must be positive, got {memory[key]!r}")
    usable = memory.get("usable_bytes", memory["capacity_bytes"])
    if not 0 < usable <= memory["capacity_bytes"]:
        raise check.fail("key 'memory.usable_bytes' must be positive and at most memory.capacity_bytes")
    if energy["pj_per_byte"] < 0 or compute.get("op_overhead_us", 0) < 0:
        raise check.fail("energy and overhead figures must not be negative")
    for class_name, rule in rules.items():
        if rule.any_dtype or not known_classes[class_name].compute:
            continue
        for dtype in sorted(rule.compute_dtypes()):
            for key, table in dtype_tables:
                if dtype not in table:
                    raise check.fail(f"classes.{class_name} computes in {dtype} but '{key}' has no '{dtype}'")
    host = data.get("host")
    if host is not None and (host == data["name"] or host not in list_profiles()):
        raise check.fail(f"key 'host' names {host!r}, which is not another known device")

    return DeviceProfile(
        name=data["name"],
        description=data["description"],
        vendor=data["vendor"],
        runtime=data["runtime"],
        formats=tuple(data["formats"]),
        host=host,
        requires_delegation=data.get("requires_delegation", False),
        unsupported_ops=tuple(data.get("unsupported_ops", [])),
        peak_tops={k: float(v) for k, v in compute["peak_tops"].items()},
        op_overhead_us=float(compute.get("op_overhead_us", 0.0)),
        capacity_bytes=memory["capacity_bytes"],
        usable_bytes=usable,
        weights_capacity_bytes=memory.get("weights_capacity_bytes"),
        bandwidth_gbps=float(memory["bandwidth_gbps"]),
        pj_per_mac={k: float(v) for k, v in energy["pj_per_mac"].items()},
        pj_per_byte=float(energy["pj_per_byte"]),
        classes=rules,
        sources=check.sources,
        path=str(path),
        raw=data,
    )


def _rule(check: _Validator, class_name: str, entry: dict[str, Any]) -> ClassRule:
    where = f"classes.{class_name}"
    acts = tuple(entry["int_activation_bits"])
    weights = tuple(entry.get("int_weight_bits", acts))
    floats = tuple(entry["float"])
    for bits in acts:
        if bits not in ACTIVATION_BITS:
            raise check.fail(f"key '{where}.int_activation_bits' has {bits}; allowed: {ACTIVATION_BITS}")
    for bits in weights:
        if bits not in WEIGHT_BITS:
            raise check.fail(f"key '{where}.int_weight_bits' has {bits}; allowed: {WEIGHT_BITS}")
    if weights and not acts:
        raise check.fail(f"key '{where}.int_weight_bits' is set but int_activation_bits is empty")
    for precision in floats:
        if precision not in FLOAT_DTYPES:
            raise check.fail(f"key '{where}.float' has {precision!r}; allowed: {', '.join(FLOAT_DTYPES)}")
    return ClassRule(acts, weights, floats, bool(entry.get("any_dtype", False)), entry["source"])


def _builtin() -> dict[str, Path]:
    folder = resources.files("edgekit.devices").joinpath("profiles")
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".toml")}


def list_profiles() -> list[str]:
    """Names of the device profiles shipped with edgekit."""
    return sorted(_builtin())


def load_profile(name: str) -> DeviceProfile:
    """A shipped profile by name, or a profile TOML file by path (same schema, same checks)."""
    builtin = _builtin()
    if name in builtin:
        return _parse(builtin[name])
    path = Path(name)
    if path.suffix == ".toml" and path.is_file():
        return _parse(path)
    raise EdgekitError(f"unknown device '{name}'; known: {', '.join(sorted(builtin))}")
