"""What several benches share; the leading underscore keeps ``make bench`` from running it."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import torch

from edgekit.evaluate import perplexity

WINDOW = 256  # the perplexity window every MobileQuant bench scores with


def rerun_command() -> str:
    """The command line that re-runs this bench, written into its results so a figure can be reproduced."""
    return shlex.join(["python", f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]])


def simulated_perplexity(model, tokens) -> float:
    """Perplexity of a simulated (fake-quant) causal LM in torch, as its exported file is scored."""
    with torch.no_grad():
        return perplexity(lambda ids: model.prefill(torch.as_tensor(ids))[0].numpy(), tokens, WINDOW, WINDOW)
