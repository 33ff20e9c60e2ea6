"""Run a ``.pte`` file in the real ExecuTorch runtime, numpy in and out.

The edge runtime's .pte backend and the exporters' verification both run programs through it.
ExecuTorch's python binding imports torch itself (only when a program is opened) and accepts only
torch tensors, so torch is touched only at that boundary (``from_numpy`` in, ``numpy()`` out: no
copies, no torch logic).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import EdgekitError

# ExecuTorch ScalarType codes (c10 numbering) -> numpy dtype names
_SCALAR_TYPES = {
    0: "uint8",
    1: "int8",
    2: "int16",
    3: "int32",
    4: "int64",
    5: "float16",
    6: "float32",
    7: "float64",
    11: "bool",
}


@dataclass(frozen=True)
class PteTensor:
    dtype: str
    shape: tuple[int, ...]


class PteProgram:
    """One method of a .pte program, loaded once and run many times.

    ``input_names`` (from the bundle manifest; a .pte stores no names) lets ``run`` take a dict;
    without them a dict is read in insertion order.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        input_names: Sequence[str] | None = None,
        method: str = "forward",
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise EdgekitError(f"no ExecuTorch program at {self.path}")
        from executorch.runtime import Runtime

        runtime = Runtime.get()
        try:
            self._program = runtime.load_program(self.path)
        except (RuntimeError, ValueError) as error:
            raise EdgekitError(
                f"{self.path.name} is not a valid ExecuTorch program (truncated or corrupt): {_first_line(error)}"
            ) from None
        if method not in self._program.method_names:
            raise EdgekitError(
                f"{self.path.name} has no method '{method}'; it has {', '.join(sorted(self._program.method_names))}"
            )
        try:
            self._method = self._program.load_method(method)
        except (RuntimeError, ValueError) as error:
            raise EdgekitError(
                f"ExecuTorch could not load method '{method}' of {self.path.name} "
                f"(a backend rejected it or the file is corrupt): {_first_line(error)}"
            ) from None
        meta = self._method.metadata
        self.inputs = [_tensor_meta(meta.input_tensor_meta(i)) for i in range(meta.num_inputs())]
        self.outputs = [_tensor_meta(meta.output_tensor_meta(i)) for i in range(meta.num_outputs())]
        self.input_names = list(input_names) if input_names is not None else None
        if self.input_names is not None and len(self.input_names) != len(self.inputs):
            raise EdgekitError(f"{self.path.name} takes {len(self.inputs)} inputs, got {len(self.input_names)} names")
        self.backends = list(runtime.backend_registry.registered_backend_names)

    def run(self, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> list[np.ndarray]:
        """Execute once; inputs are checked against the program's static shapes and dtypes."""
        arrays = self._ordered(inputs)
        tensors = [_to_tensor(self._checked(i, a)) for i, a in enumerate(arrays)]
        try:
            outputs = self._method.execute(tensors)
        except RuntimeError as error:
            raise EdgekitError(f"ExecuTorch failed to run {self.path.name}: {_first_line(error)}") from None
        return [_to_numpy(o) for o in outputs]

    def _ordered(self, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> list[Any]:
        if isinstance(inputs, Mapping):
            if self.input_names is None:
                values = list(inputs.values())
            else:
                missing = [n for n in self.input_names if n not in inputs]
                if missing:
                    raise EdgekitError(f"missing input '{missing[0]}' (inputs: {', '.join(self.input_names)})")
                values = [inputs[n] for n in self.input_names]
        else:
            values = list(inputs)
        if len(values) != len(self.inputs):
            raise EdgekitError(f"{self.path.name} takes {len(self.inputs)} inputs, got {len(values)}")
        return values

    def _checked(self, index: int, value: Any) -> np.ndarray:
        expected = self.inputs[index]
        name = self.input_names[index] if self.input_names else f"#{index}"
        array = np.asarray(value)
        if tuple(array.shape) != expected.shape:
            raise EdgekitError(
                f"input {name} has shape {list(array.shape)}; this program was exported for {list(expected.shape)}"
            )
        want = np.dtype(expected.dtype)
        if array.dtype != want:
            if array.dtype.kind == "f" and want.kind in "iub":
                raise EdgekitError(f"input {name} is {array.dtype}, the program expects {want}")
            array = array.astype(want)
        if want.kind == "f" and not np.isfinite(array).all():
            raise EdgekitError(f"input {name} contains NaN or infinity")
        return np.ascontiguousarray(array)


def _tensor_meta(info: Any) -> PteTensor:
    code = int(info.dtype())
    return PteTensor(dtype=_SCALAR_TYPES.get(code, f"scalar_type_{code}"), shape=tuple(int(d) for d in info.sizes()))


def _to_tensor(array: np.ndarray) -> Any:
    import torch  # the binding's own dependency; it accepts torch tensors only

    return torch.from_numpy(array)


def _to_numpy(value: Any) -> np.ndarray:
    return value.detach().numpy() if hasattr(value, "detach") else np.asarray(value)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
