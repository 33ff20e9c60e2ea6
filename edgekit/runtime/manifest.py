"""The bundle manifest: the contract between the export side and the edge runtime.

Plain JSON described by dataclasses. It lives in the runtime package because the runtime must read
it without torch; the exporters import it to write it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgekit.errors import EdgekitError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"

NUMPY_DTYPES = {
    "float32": "float32",
    "float16": "float16",
    "int64": "int64",
    "int32": "int32",
    "int8": "int8",
    "uint8": "uint8",
    "bool": "bool",
}


@dataclass
class TensorSpec:
    name: str
    dtype: str
    shape: list[int | str]  # a string names a dynamic axis

    def matches(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.shape) and all(
            isinstance(want, str) or want == got for want, got in zip(self.shape, shape, strict=True)
        )


@dataclass
class GraphSpec:
    file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraphSpec:
        return cls(
            file=data["file"],
            inputs=[TensorSpec(**spec) for spec in data["inputs"]],
            outputs=[TensorSpec(**spec) for spec in data["outputs"]],
        )


@dataclass
class FormatSpec:
    """One exported format of the bundle: its graphs (``main``, or ``prefill``/``decode``)."""

    graphs: dict[str, GraphSpec]
    files: list[str] = field(default_factory=list)  # every file of this format (graphs + external data)
    quantization: dict[str, Any] = field(default_factory=dict)  # params at graph edges
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FormatSpec:
        return cls(
            graphs={name: GraphSpec.from_dict(graph) for name, graph in data["graphs"].items()},
            files=list(data.get("files", [])),
            quantization=dict(data.get("quantization", {})),
            details=dict(data.get("details", {})),
        )


@dataclass
class Manifest:
    model: dict[str, Any]  # spec, task, source_hash, description, labels
    recipe: dict[str, Any]
    device: str
    formats: dict[str, FormatSpec]
    language_model: dict[str, Any] | None = None  # layers, kv heads, head_dim, eos ids, tokenizer file
    depths: list[int] | None = None
    timesteps: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    edgekit_version: str = ""
    created: str = ""

    @property
    def task(self) -> str:
        return str(self.model.get("task", "generic"))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def write(self, directory: Path) -> Path:
        path = directory / MANIFEST_NAME
        path.write_text(self.to_json())
        return path

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        path = Path(directory) / MANIFEST_NAME
        if not Path(directory).is_dir():
            raise EdgekitError(f"no such bundle directory: {directory}")
        if not path.is_file():
            raise EdgekitError(f"{directory} is not an edgekit bundle (no {MANIFEST_NAME})")
        try:
            data = json.loads(path.read_text())
        except ValueError as error:
            raise EdgekitError(f"{path} is not valid JSON: {error}") from None
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise EdgekitError(f"{path}: schema version {version} is not supported (want {SCHEMA_VERSION})")
        try:
            data["formats"] = {name: FormatSpec.from_dict(spec) for name, spec in data["formats"].items()}
            return cls(**data)
        except (KeyError, TypeError) as error:
            raise EdgekitError(f"{path}: malformed manifest ({error})") from None
