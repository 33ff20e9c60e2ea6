"""Resolve a model spec to a :class:`ModelBundle`."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import sys
from pathlib import Path
from typing import Any

import torch

from edgekit.cache import file_sha256
from edgekit.errors import EdgekitError
from edgekit.models.bundle import ModelBundle
from edgekit.models.zoo import zoo_entry


def load(spec: str) -> ModelBundle:
    """Load ``zoo:NAME``, a Hugging Face directory, ``pkg.module:factory`` or a ``.pt2`` file."""
    if spec.startswith("zoo:"):
        return zoo_entry(spec[4:]).load()
    path = Path(spec).expanduser()
    if spec.endswith(".pt2"):
        if not path.is_file():
            raise EdgekitError(f"no such exported program: {spec}")
        return load_exported_program(path)
    if path.is_dir():
        from edgekit.models.hf import load_directory

        return load_directory(path)
    if ":" in spec and not path.exists() and "/" not in spec.split(":")[0]:
        return load_factory(spec)
    if path.exists():
        raise EdgekitError(f"{spec} is neither a Hugging Face model directory nor a .pt2 program")
    raise EdgekitError(f"cannot resolve model '{spec}': not a path, not zoo:NAME, not pkg.module:factory")


def _named_inputs(forward: Any, example: Any) -> dict[str, torch.Tensor]:
    if isinstance(example, dict):
        return dict(example)
    tensors = (example,) if isinstance(example, torch.Tensor) else tuple(example)
    try:
        params = [p for p in inspect.signature(forward).parameters.values() if p.name != "self"]
        names = [p.name for p in params][: len(tensors)]
    except (TypeError, ValueError):
        names = []
    if len(names) < len(tensors):
        names = [f"input_{i}" for i in range(len(tensors))]
    return dict(zip(names, tensors, strict=True))


def load_factory(spec: str) -> ModelBundle:
    """``pkg.module:factory`` returns a ModelBundle, a module with ``example_inputs``, or (module, inputs)."""
    module_name, _, function_name = spec.partition(":")
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        factory = getattr(importlib.import_module(module_name), function_name)
    except ModuleNotFoundError as error:
        raise EdgekitError(f"factory {spec}: cannot import module '{error.name}'") from None
    except AttributeError:
        raise EdgekitError(f"factory {spec}: module '{module_name}' has no '{function_name}'") from None
    try:
        made = factory()
    except Exception as error:  # the user's code failed; say so in one line
        raise EdgekitError(f"factory {spec} raised {type(error).__name__}: {error}") from None
    if isinstance(made, ModelBundle):
        return made
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        module, example = made
    elif isinstance(made, torch.nn.Module):
        module, example = made, getattr(made, "example_inputs", None)
    else:
        raise EdgekitError(f"factory {spec} returned {type(made).__name__}, not a torch.nn.Module")
    if example is None:
        raise EdgekitError(f"factory {spec}: return (module, example_inputs) or set module.example_inputs")
    module.eval()
    return ModelBundle(
        spec=spec,
        module=module,
        example_inputs=_named_inputs(module.forward, example),
        task="generic",
        source_hash=state_hash(module),
        description=f"factory {spec}",
    )


def load_exported_program(path: Path) -> ModelBundle:
    """A saved ``torch.export`` program; its recorded example inputs become the bundle's."""
    try:
        program = torch.export.load(str(path))
    except Exception as error:
        raise EdgekitError(
            f"{path} is not a readable torch.export program ({type(error).__name__})"
        ) from None
    if program.example_inputs is None:
        raise EdgekitError(f"{path} was saved without example inputs; re-export with torch.export.export")
    args, kwargs = program.example_inputs
    names = [
        spec.arg.name
        for spec in program.graph_signature.input_specs
        if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT
    ]
    flat = list(args) + list(kwargs.values())
    return ModelBundle(
        spec=str(path),
        module=program.module(),
        example_inputs=dict(zip(names, flat, strict=True)),
        task="generic",
        source_hash=file_sha256(path),
        description=f"exported program {path.name}",
    )


def state_hash(module: torch.nn.Module) -> str:
    """SHA-256 over the state dict: the source hash a bundle's manifest records."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
