"""Runtime backends: one exported graph file, run on named numpy arrays.

onnxruntime is imported at module load; ExecuTorch only when a .pte is opened, since its Python
binding pulls in torch (on a phone the C++ runtime has no such cost).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from edgekit.errors import EdgekitError


class Backend(Protocol):
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


# onnxruntime's x64 int8 kernels multiply uint8 activations by int8 weights with VPMADDUBSW, whose
# int16 pair sums saturate on CPUs without VNNI (AVX2/AVX-512F): measured here on MobileNetV2 int8,
# 1.6-20 dB against the simulated model instead of 21-24 dB. This option makes onnxruntime take its
# exact (slower) path there; CPUs with VNNI, and other providers, are unaffected.
X64_EXACT_INT8 = ("session.x64quantprecision", "1")


class OnnxBackend:
    """An onnxruntime CPU session (the same QDQ file QNN's provider would take on a Snapdragon)."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        if not path.is_file():
            raise EdgekitError(f"missing model file {path}")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.add_session_config_entry(*X64_EXACT_INT8)
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own Fail/InvalidProtobuf types
            first_line = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            raise EdgekitError(f"{path} is not a valid ONNX model (truncated or corrupt?): {first_line}") from None
        self.output_names = [output.name for output in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, results, strict=True))


class PteBackend:
    """An ExecuTorch program's ``forward`` method, through ExecuTorch's Python runtime."""

    def __init__(self, path: Path, output_names: list[str]) -> None:
        if not path.is_file():
            raise EdgekitError(f"missing model file {path}")
        from executorch.runtime import Runtime

        try:
            program = Runtime.get().load_program(str(path))
            self.method = program.load_method("forward")
        except Exception:
            raise EdgekitError(f"{path} is not a loadable ExecuTorch program (truncated or corrupt?)") from None
        if self.method is None:
            raise EdgekitError(f"{path} has no 'forward' method")
        self.output_names = output_names

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch  # ExecuTorch's binding exchanges torch tensors; it is already loaded with it

        outputs = self.method.execute([torch.from_numpy(np.ascontiguousarray(value)) for value in feeds.values()])
        arrays = [output.numpy() if hasattr(output, "numpy") else np.asarray(output) for output in outputs]
        return dict(zip(self.output_names, arrays, strict=True))
