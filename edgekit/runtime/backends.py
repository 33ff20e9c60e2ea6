"""Runtime backends: one exported graph file, run on named numpy arrays.

onnxruntime is imported at module load; ExecuTorch only when a .pte is opened, since its Python
binding pulls in torch (on a phone the C++ runtime has no such cost).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.runtime.pte import PteProgram


class Backend(Protocol):
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def onnx_session_options(threads: int | None = None, exact_x64: bool = True):
    """onnxruntime options every edgekit session uses.

    ``exact_x64`` sets ``session.x64quantprecision``: x86 CPUs without VNNI (AVX2/AVX-512 only) then
    run 8-bit MatMul/Conv as u8u8 instead of u8s8, whose ``vpmaddubsw`` saturates its 16-bit sums
    and costs 10-20 dB of SQNR. Phones and NPUs have no such limit, so without it a host like that
    would judge a QDQ file worse than its target runs it.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if exact_x64:
        options.add_session_config_entry("session.x64quantprecision", "1")
    if threads:
        options.intra_op_num_threads = threads
    return options


def open_onnx_session(path: Path, threads: int | None = None):
    """An onnxruntime CPU session on ``path``, exact 8-bit arithmetic where onnxruntime can give it.

    onnxruntime's u8s8 -> u8u8 rewrite fails on some graphs ("Attempt to replace the existing
    tensor" when quantization parameters are shared); those open with the default kernels. Errors
    of the file itself surface from the second attempt, as onnxruntime raises them.
    """
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), onnx_session_options(threads), providers=providers)
    except Exception:
        return ort.InferenceSession(str(path), onnx_session_options(threads, exact_x64=False), providers=providers)


class OnnxBackend:
    """An onnxruntime CPU session (the same QDQ file QNN's provider would take on a Snapdragon)."""

    def __init__(self, path: Path, threads: int | None = None) -> None:

        if not path.is_file():
            raise EdgekitError(f"missing model file {path}")
        try:
            self.session = open_onnx_session(path, threads)
        except Exception as error:  # onnxruntime raises its own Fail/InvalidProtobuf types
            first_line = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            raise EdgekitError(f"{path} is not a valid ONNX model (truncated or corrupt?): {first_line}") from None
        self.output_names = [output.name for output in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, results, strict=True))


class PteBackend:
    """An ExecuTorch program's ``forward`` method; names come from the manifest (a .pte has none)."""

    def __init__(self, path: Path, input_names: list[str], output_names: list[str]) -> None:
        self.program = PteProgram(path, input_names)
        self.output_names = output_names

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.program.run(feeds), strict=True))
