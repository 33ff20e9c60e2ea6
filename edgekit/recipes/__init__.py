"""Recipes are data: a TOML file naming a transform and its settings.

A recipe file looks like::

    name = "ptq-int8"
    description = "..."
    transform = "ptq"            # a key of TRANSFORMS
    [settings]                   # fields of the transform's Config dataclass
    samples = 128
    [verify]                     # fields of VerifyConfig
    min_sqnr_db = 15.0

``--set key=value`` overrides a settings field (or ``verify.key=value``). A new method is one
module with ``Config`` and ``apply(bundle, data, config)`` plus one entry in ``TRANSFORMS``; it may
add ``settings_for(config, module)`` to fill in settings whose default depends on the model.
"""

from __future__ import annotations

import dataclasses
import importlib
import tomllib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from edgekit.errors import EdgekitError

# transform name -> module holding ``Config`` (dataclass) and ``apply(bundle, data, config)``
TRANSFORMS: dict[str, str] = {
    "identity": "edgekit.recipes.identity",
    "ptq": "edgekit.quantize.ptq",
    "snn-iir": "edgekit.snn.recipe",
    "mobilequant": "edgekit.quantize.mobilequant",
    "sorted": "edgekit.sorted.recipe",
}


@dataclass
class VerifyConfig:
    """Tolerance of the exported file against the torch simulated (and float) model on sample inputs."""

    samples: int = 8
    min_sqnr_db: float = 30.0
    min_top1_agreement: float = 0.95
    # set: pass when the runtime is no further from float than the simulated model, within this
    # many dB (min_sqnr_db then only floors the runtime-vs-simulated SQNR); see exporters.verify.judge
    float_gap_db: float | None = None
    max_top1_drop: float = 0.0  # with float_gap_db: top-1 agreement with float may fall this much


@dataclass
class Recipe:
    name: str
    description: str
    transform: str
    settings: Any
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    source: str = ""

    def transform_module(self) -> types.ModuleType:
        return importlib.import_module(TRANSFORMS[self.transform])

    def for_model(self, module: Any) -> Recipe:
        """This recipe with the settings it leaves to the model filled in: a transform may define
        ``settings_for(config, module)`` (MobileQuant's calibration budget depends on the family)."""
        resolve = getattr(self.transform_module(), "settings_for", None)
        return self if resolve is None else dataclasses.replace(self, settings=resolve(self.settings, module))

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "transform": self.transform,
            "settings": dataclasses.asdict(self.settings),
            "verify": dataclasses.asdict(self.verify),
        }


def _builtin_files() -> dict[str, Path]:
    folder = resources.files("edgekit.recipes")
    return {Path(str(entry)).stem: Path(str(entry)) for entry in folder.iterdir() if str(entry).endswith(".toml")}


def names() -> list[str]:
    return sorted(_builtin_files())


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check (and, for strings from --set, convert) ``value`` against a dataclass field type."""
    hint = annotation
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        hint = options[0]
        origin = typing.get_origin(hint)
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1] or (str,)
        # "--set ladder=5,3,1" and the TOML spelling "--set ladder=[5,3,1]" mean the same list
        items = value.strip().removeprefix("[").removesuffix("]").split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise EdgekitError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v.strip() if isinstance(v, str) else v, item, where) for v in items]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise EdgekitError(f"{where}: expected true/false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise EdgekitError(f"{where}: expected {hint.__name__}, got {value!r}")
        if isinstance(value, int | float) and (hint is float or isinstance(value, int)):
            return hint(value)
        if isinstance(value, str):
            try:
                return hint(value)
            except ValueError:
                pass
        raise EdgekitError(f"{where}: expected {hint.__name__}, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise EdgekitError(f"{where}: expected a string, got {value!r}")
    return value


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        allowed = f"known: {', '.join(sorted(known))}" if known else "it takes no settings"
        raise EdgekitError(f"{where}: unknown setting '{unknown[0]}'; {allowed}")
    return cls(**{key: _coerce(value, hints[key], f"{where}.{key}") for key, value in values.items()})


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    parsed: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise EdgekitError(f"--set expects key=value, got '{pair}'")
        parsed[key.strip()] = value.strip()
    return parsed


def load(name_or_path: str, overrides: dict[str, Any] | None = None) -> Recipe:
    """A builtin recipe by name, or a recipe TOML file, with ``--set`` overrides applied."""
    builtin = _builtin_files()
    path = Path(name_or_path)
    if name_or_path in builtin:
        path = builtin[name_or_path]
    elif not (path.suffix == ".toml" and path.is_file()):
        raise EdgekitError(f"unknown recipe '{name_or_path}'; known: {', '.join(sorted(builtin))}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise EdgekitError(f"recipe {path.name} is not valid TOML: {error}") from None
    where = f"recipe {path.name}"
    unknown = sorted(set(data) - {"name", "description", "transform", "settings", "verify"})
    if unknown:
        raise EdgekitError(f"{where}: unknown field '{unknown[0]}'")
    transform = data.get("transform")
    if transform not in TRANSFORMS:
        raise EdgekitError(f"{where}: transform {transform!r} is not one of {', '.join(TRANSFORMS)}")
    for table in ("settings", "verify"):
        if not isinstance(data.get(table, {}), dict):
            raise EdgekitError(f"{where}: [{table}] must be a table")
    settings = dict(data.get("settings", {}))
    verify = dict(data.get("verify", {}))
    for key, value in (overrides or {}).items():
        if key.startswith("verify."):
            verify[key.removeprefix("verify.")] = value
        else:
            settings[key] = value
    module = importlib.import_module(TRANSFORMS[transform])
    return Recipe(
        name=str(data.get("name", path.stem)),
        description=str(data.get("description", "")),
        transform=transform,
        settings=_build(module.Config, settings, f"{where} [settings]"),
        verify=_build(VerifyConfig, verify, f"{where} [verify]"),
        source=str(path),
    )
