"""What several benches share; the leading underscore keeps ``make bench`` from running it."""

from __future__ import annotations

import multiprocessing
import shlex
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from edgekit.evaluate import perplexity

WINDOW = 256  # the perplexity window every MobileQuant bench scores with


def rerun_command() -> str:
    """The command line that re-runs this bench, written into its results so a figure can be reproduced."""
    return shlex.join(["python", f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]])


def finite_or_none(value: float) -> float | None:
    """JSON has no Infinity: a simulated model equal to float (fp32 recipes) is recorded as null."""
    return value if np.isfinite(value) else None


def simulated_perplexity(model, tokens) -> float:
    """Perplexity of a simulated (fake-quant) causal LM in torch, as its exported file is scored."""
    with torch.no_grad():
        return perplexity(lambda ids: model.prefill(torch.as_tensor(ids))[0].numpy(), tokens, WINDOW, WINDOW)


def alternated_seconds(runs: Mapping[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds of each run, the runs alternated so all see the same machine load; each timed
    run follows an untimed one of the same callable (caches then hold its data, not the other's)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            run()
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return {name: float(np.median(values)) for name, values in times.items()}


def fresh_process_pte_seconds(
    paths: Mapping[str, Path], feeds: Mapping[str, np.ndarray], rounds: int
) -> dict[str, float]:
    """:func:`alternated_seconds` of one run of each .pte, in a new interpreter.

    A phone app runs the program alone; a bench process has trained a model and holds onnxruntime
    sessions. Timing the same files both ways shows whether that skews XNNPACK (on SmolLM2's int8
    program, one run: 1.87x its fp32 program here, 2.14x in the bench process).
    """
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_alternated_pte_seconds, (dict(paths), dict(feeds), rounds))


def _alternated_pte_seconds(paths: dict[str, Path], feeds: dict[str, np.ndarray], rounds: int) -> dict[str, float]:
    from edgekit.runtime.pte import PteProgram

    programs = {name: PteProgram(path, list(feeds)) for name, path in paths.items()}
    return alternated_seconds({name: (lambda p=p: p.run(feeds)) for name, p in programs.items()}, rounds)
