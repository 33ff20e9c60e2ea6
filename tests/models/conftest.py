"""Real zoo assets loaded once per test session (SmolLM2 takes seconds even from the cache)."""

from __future__ import annotations

import pytest

from edgekit.models.bundle import ModelBundle


@pytest.fixture(scope="session")
def smollm2_bundle() -> ModelBundle:
    from edgekit.models import smollm2

    return smollm2.load()
