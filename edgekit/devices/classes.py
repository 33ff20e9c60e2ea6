"""Op classes: which kind of work an exported op type does, read from ``op_classes.toml``.

Device rules are written per class (matmul, norm, softmax, ...) rather than per op type, so that
ONNX ``LayerNormalization`` and ExecuTorch ``aten.native_layer_norm.default`` meet the same rule.
"""

from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass
from importlib import resources

UNKNOWN = "unknown"

# namespaces whose names carry a trailing overload ("aten.add.Tensor") that the table leaves out
_OVERLOADED = ("aten.", "quantized_decomposed.", "dim_order_ops.", "torchao.", "llama.", "higher_order.")


@dataclass(frozen=True)
class OpClass:
    name: str
    compute: bool  # counts towards integer coverage
    description: str
    op_types: tuple[str, ...]


@functools.cache
def op_classes() -> dict[str, OpClass]:
    """The class table, class name -> OpClass; an op type listed twice is a bug in the table."""
    text = resources.files("edgekit.devices").joinpath("op_classes.toml").read_text()
    table = tomllib.loads(text)["classes"]
    classes: dict[str, OpClass] = {}
    owner: dict[str, str] = {}
    for name, entry in table.items():
        types = tuple(entry.get("onnx", [])) + tuple(entry.get("executorch", []))
        for op_type in types:
            if op_type in owner:
                raise ValueError(f"op_classes.toml lists {op_type!r} under {owner[op_type]} and {name}")
            owner[op_type] = name
        classes[name] = OpClass(name, bool(entry["compute"]), str(entry["description"]), types)
    return classes


@functools.cache
def _index() -> dict[str, str]:
    return {op_type: cls.name for cls in op_classes().values() for op_type in cls.op_types}


def normalise(op_type: str) -> str:
    """Table spelling: "aten::add.Tensor" -> "aten.add", "com.microsoft:Gelu" -> "Gelu"."""
    name = op_type.strip().replace("::", ".")
    index = _index()
    if name in index:
        return name
    if ":" in name:  # ONNX domain-qualified type
        name = name.rsplit(":", 1)[1]
    name = name.removeprefix("com.microsoft.").removeprefix("ai.onnx.")
    if name in index:
        return name
    if name.startswith(_OVERLOADED) and name.count(".") >= 2:
        base = name.rsplit(".", 1)[0]
        if base in index:
            return base
    return name


def op_class(op_type: str) -> str:
    """The class of an op type, or ``"unknown"`` when the table does not list it."""
    return _index().get(normalise(op_type), UNKNOWN)


def is_compute(class_name: str) -> bool:
    cls = op_classes().get(class_name)
    return cls.compute if cls else True  # an unknown op may well compute: count it, it is not covered
