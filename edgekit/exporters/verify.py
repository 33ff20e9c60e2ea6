"""Verification helpers: score an exported file's outputs against a reference, open ORT sessions.

Numbers come from :mod:`edgekit.evaluate`, so reports, benchmarks and the torch-free runtime all
measure the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.evaluate import cosine, max_abs_error, sqnr_db, top1_agreement
from edgekit.runtime.backends import open_onnx_session

ENCODER_TASKS = ("vision-encoder", "text-encoder")
ARGMAX_TASKS = ("classifier", "causal-lm")


def compare(reference: np.ndarray, candidate: np.ndarray, task: str) -> dict[str, Any]:
    """How close ``candidate`` is to ``reference`` (same shape), with the measures ``task`` cares about.

    Always ``max_abs``, ``sqnr_db`` and ``finite``; plus ``top1_agreement`` for classifiers (over the
    batch) and causal LMs (next-token choice over every position), ``cosine`` for encoders (mean over
    the last-axis vectors; for vision encoders also ``cls_cosine`` on token 0).
    """
    reference = np.asarray(reference)
    candidate = np.asarray(candidate)
    if reference.shape != candidate.shape:
        raise EdgekitError(f"output shape {candidate.shape} does not match the reference {reference.shape}")
    finite = bool(np.all(np.isfinite(candidate)))
    result: dict[str, Any] = {
        "max_abs": max_abs_error(reference, candidate) if finite else float("nan"),
        "sqnr_db": sqnr_db(reference, candidate) if finite else float("nan"),
        "finite": finite,
    }
    if task in ARGMAX_TASKS:
        result["top1_agreement"] = top1_agreement(candidate, reference)
    if task in ENCODER_TASKS:
        result["cosine"] = cosine(reference, candidate) if finite else float("nan")
        if task == "vision-encoder" and reference.ndim == 3:
            result["cls_cosine"] = cosine(reference[:, 0], candidate[:, 0]) if finite else float("nan")
    return result


def judge(result: dict[str, Any], tolerance: Any) -> list[str]:
    """Why a verification ``result`` (see ``pipeline.verify``) fails ``tolerance``; empty when it passes.

    ``tolerance`` is a recipe's ``[verify]`` table (``min_sqnr_db``, ``min_top1_agreement``,
    ``float_gap_db``, ``max_top1_drop``). Two criteria:

    - ``float_gap_db`` unset (fp32, SNN, sorted): the runtime must reproduce the simulated model,
      SQNR(runtime, simulated) >= ``min_sqnr_db`` and top-1 agreement >= ``min_top1_agreement``.
    - ``float_gap_db`` set (integer recipes): onnxruntime's QNN tests' criterion. The runtime may
      break rounding ties differently from the simulation (a one-step difference early in a deep
      int8 net grows like quantization noise), so it must be *no further from float than the
      simulated model is*, within the margin: SQNR(runtime, float) >= SQNR(simulated, float) -
      ``float_gap_db``, and its top-1 agreement with float at most ``max_top1_drop`` below the
      simulated model's. ``min_sqnr_db`` stays as a floor on SQNR(runtime, simulated), so a file
      that computes something else entirely (wrong scale, wrong layout) still fails.
    """
    failures: list[str] = []
    check = result["runtime_vs_simulated"]
    if not check["finite"]:
        return ["the runtime output is not finite"]
    if check["sqnr_db"] < tolerance.min_sqnr_db:
        failures.append(f"SQNR {check['sqnr_db']:.1f} dB < {tolerance.min_sqnr_db} dB against the simulated model")
    gap = getattr(tolerance, "float_gap_db", None)
    if gap is None:
        agreement = check.get("top1_agreement")
        if agreement is not None and agreement < tolerance.min_top1_agreement:
            failures.append(f"top-1 agreement {agreement:.3f} < {tolerance.min_top1_agreement} with simulated")
        return failures
    runtime, simulated = result["runtime_vs_float"], result["simulated_vs_float"]
    if runtime["sqnr_db"] < simulated["sqnr_db"] - gap:
        failures.append(
            f"{runtime['sqnr_db']:.1f} dB from float, the simulated model {simulated['sqnr_db']:.1f} dB "
            f"(allowed gap {gap} dB)"
        )
    drop = getattr(tolerance, "max_top1_drop", 0.0)
    if runtime.get("top1_agreement") is not None and runtime["top1_agreement"] < simulated["top1_agreement"] - drop:
        failures.append(
            f"top-1 agreement with float {runtime['top1_agreement']:.3f}, the simulated model's "
            f"{simulated['top1_agreement']:.3f} (allowed drop {drop})"
        )
    return failures


def onnx_session(path: Path | str, *, threads: int | None = None):
    """An onnxruntime InferenceSession on ``path``; a missing or corrupt file is an EdgekitError."""
    path = Path(path)
    if not path.is_file():
        raise EdgekitError(f"no such ONNX file: {path}")
    try:
        return open_onnx_session(path, threads)
    except Exception as error:  # ORT raises its own exception types (InvalidProtobuf, Fail, ...)
        message = str(error)
        if "external" in message.lower() or "No such file" in message:
            raise EdgekitError(f"{path}: its external weights are missing or unreadable") from None
        raise EdgekitError(f"{path} is not a valid ONNX file (truncated?)") from None


def run(session, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run ``session`` on ``feeds`` (cast to the graph's input dtypes); outputs in graph order."""
    wanted = {i.name: i.type for i in session.get_inputs()}
    missing = sorted(set(wanted) - set(feeds))
    if missing:
        raise EdgekitError(f"missing inputs for the ONNX graph: {', '.join(missing)}")
    cast = {}
    for name, value in feeds.items():
        if name in wanted:
            cast[name] = np.asarray(value, dtype=_ort_dtype(wanted[name]))
    return session.run(None, cast)


def _ort_dtype(type_name: str) -> np.dtype:
    table = {
        "tensor(float)": np.float32,
        "tensor(float16)": np.float16,
        "tensor(double)": np.float64,
        "tensor(int64)": np.int64,
        "tensor(int32)": np.int32,
        "tensor(uint8)": np.uint8,
        "tensor(int8)": np.int8,
        "tensor(bool)": np.bool_,
    }
    return np.dtype(table.get(type_name, np.float32))


def greedy_generate(prefill, decode, input_ids: np.ndarray, steps: int) -> list[int]:
    """Greedy continuation of ``input_ids`` [1, S] through a prefill + decode graph pair.

    The prefill graph's ``present.*`` outputs become the decode graph's ``past.*`` inputs, and each
    decode step's presents the next step's pasts: the KV cache round-trips through the files.
    """
    past_names = [i.name for i in decode.get_inputs() if i.name != "input_ids"]
    present_names = [o.name for o in prefill.get_outputs()][1:]
    outputs = prefill.run(None, {"input_ids": np.asarray(input_ids, dtype=np.int64)})
    tokens: list[int] = []
    for _ in range(steps):
        token = int(np.asarray(outputs[0])[0, -1].argmax())
        tokens.append(token)
        cache = dict(zip(present_names, outputs[1:], strict=True))
        feed = {"input_ids": np.array([[token]], dtype=np.int64)}
        feed.update({name: cache[name.replace("past.", "present.", 1)] for name in past_names})
        outputs = decode.run(None, feed)
    return tokens
