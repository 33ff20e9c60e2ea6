"""Where models come from: ``load(spec) -> ModelBundle``.

Specs: ``zoo:NAME``; a local Hugging Face model directory; ``pkg.module:factory``; a saved
``torch.export`` program (``.pt2``).
"""

from __future__ import annotations

from edgekit.models.bundle import TASK_KINDS, ModelBundle, TaskKind
from edgekit.models.sources import load

__all__ = ["TASK_KINDS", "ModelBundle", "TaskKind", "load"]
