"""Fixtures for the kernel tests: fresh random inputs each run, with the seed reported."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """A generator with a fresh seed, printed (shown when the test fails) to replay it."""
    seed = int(np.random.SeedSequence().entropy % (1 << 63))
    print(f"{request.node.nodeid}: seed={seed}")
    return np.random.default_rng(seed)
