"""ModelBundle: what every model source produces and every transform and exporter consumes."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

TaskKind = Literal["classifier", "causal-lm", "vision-encoder", "text-encoder", "generic"]
TASK_KINDS: tuple[str, ...] = ("classifier", "causal-lm", "vision-encoder", "text-encoder", "generic")


@dataclass
class ModelBundle:
    """A torch model with everything needed to feed it, judge it and export it.

    ``module(**example_inputs)`` returns one tensor (logits, or an embedding / hidden state for
    encoders). Transforms return a copy with ``simulated`` (the fake-quant, spiking or truncated
    twin used in verification) and ``quant`` (the export plan) filled in.
    """

    spec: str
    module: torch.nn.Module
    example_inputs: dict[str, torch.Tensor]
    task: TaskKind
    output_names: list[str] = field(default_factory=lambda: ["output"])
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    preprocess: Callable[[Any], dict[str, torch.Tensor]] | None = None
    tokenizer: Any = None
    labels: list[str] | None = None
    dataset: str | None = None
    source_hash: str = ""
    description: str = ""
    simulated: torch.nn.Module | None = None
    quant: Any = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def input_names(self) -> list[str]:
        return list(self.example_inputs)

    def simulated_for(self, fmt: str) -> torch.nn.Module:
        """The torch twin of what format ``fmt`` computes. A transform may lower a different
        program per format (``ptq`` under the gemm-inputs scope: the .pte runs XNNPACK's dynamic
        int8 linears), kept in ``meta["simulated_by_format"]``; else the one simulated model."""
        return self.meta.get("simulated_by_format", {}).get(fmt) or self.simulated or self.module

    def replace(self, **changes: Any) -> ModelBundle:
        return dataclasses.replace(self, **changes)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.module.parameters())
