"""Fixtures for the kernel tests: fresh random inputs each run, with the seed reported."""

from __future__ import annotations

import jax
import numpy as np
import pytest


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """A generator with a fresh seed, printed (shown when the test fails) to replay it."""
    seed = int(np.random.SeedSequence().entropy % (1 << 63))
    print(f"{request.node.nodeid}: seed={seed}")
    return np.random.default_rng(seed)


@pytest.fixture(autouse=True)
def exact_float32_references():
    """Float32 references are exact: on a GPU, XLA's default float32 dot is TF32 (relative
    error ~5e-4, measured on an H200), far above the 1e-5 the kernels are held to. The
    kernels fix their own precision (IEEE for float32), so this moves only the references."""
    with jax.default_matmul_precision("highest"):
        yield
