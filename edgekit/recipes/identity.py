"""The ``identity`` transform: export the float model as it is (the ``fp32`` recipe)."""

from __future__ import annotations

from dataclasses import dataclass

from edgekit.models.bundle import ModelBundle


@dataclass
class Config:
    """No settings: fp32 export keeps the model unchanged."""


def apply(bundle: ModelBundle, data: object, config: Config) -> ModelBundle:
    return bundle.replace(simulated=bundle.module)
