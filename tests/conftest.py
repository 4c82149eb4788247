"""Test set-up: 8 virtual CPU devices, unless ``JAX_PLATFORMS`` names other platforms
(``make test-gpu`` runs the ``gpu``-marked tests with ``JAX_PLATFORMS=cuda,cpu``).

The XLA flag must be set before JAX initialises its backends, so it is set here, at
import time of the first conftest, before any test module imports JAX.
"""

from __future__ import annotations

import os
from typing import NamedTuple

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_xla_flags = os.environ.get("XLA_FLAGS", "")
if os.environ["JAX_PLATFORMS"] == "cpu" and "host_platform_device_count" not in _xla_flags:
    os.environ["XLA_FLAGS"] = f"{_xla_flags} --xla_force_host_platform_device_count=8".strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from hypothesis import settings  # noqa: E402

# CI replays the same examples every run (a red CI is then reproducible); local runs explore.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def _has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def _has_aot() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu, aot = _has_gpu(), _has_aot()
    skip_gpu = pytest.mark.skip(reason="no GPU on this machine")
    skip_aot = pytest.mark.skip(reason="deviceless GPU compiles need the 'aot' extra")
    for item in items:
        if "gpu" in item.keywords and not gpu:
            item.add_marker(skip_gpu)
        if "deviceless" in item.keywords and not aot:
            item.add_marker(skip_aot)


@pytest.fixture(scope="session")
def num_devices() -> int:
    return len(jax.devices())


# -- models nobody here wrote the structure of: stock flax.nnx layers -------------------------


class StockModel(NamedTuple):
    """A model, example arguments, and the partition rules its layer names need."""

    model: nnx.Module
    args: tuple[jax.Array, ...]
    rules: tuple[tuple[str, int | None], ...]


class StockTransformer(nnx.Module):
    """A decoder block of stock flax.nnx layers."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(50, 32, rngs=rngs)
        self.ln1 = nnx.LayerNorm(32, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=4, in_features=32, decode=False, dropout_rate=0.0, rngs=rngs
        )
        self.ln2 = nnx.RMSNorm(32, rngs=rngs)
        self.fc1 = nnx.Linear(32, 64, rngs=rngs)
        self.fc2 = nnx.Linear(64, 32, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        mask = nnx.make_causal_mask(tokens)
        x = x + self.attn(self.ln1(x), mask=mask, deterministic=True)
        return x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))


class MLPStack(nnx.Module):
    """Four nnx.Linear layers with ReLU between them."""

    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(16, 16, rngs=rngs) for _ in range(4)])

    def __call__(self, x):
        for layer in self.layers:
            x = jax.nn.relu(layer(x))
        return x


@pytest.fixture
def stock_transformer() -> StockModel:
    """StockTransformer on tokens [2, 5]; fc1 column- and fc2 row-parallel."""
    tokens = jnp.arange(10, dtype=jnp.int32).reshape(2, 5)
    rules = ((r"fc1\.kernel$", 1), (r"fc1\.bias$", 0), (r"fc2\.kernel$", 0))
    return StockModel(StockTransformer(nnx.Rngs(1)), (tokens,), rules)


@pytest.fixture
def mlp_stack() -> StockModel:
    """MLPStack on x [3, 16]; layers 0/2 column- and 1/3 row-parallel (Megatron pairs)."""
    x = jax.random.normal(jax.random.key(0), (3, 16))
    rules = (
        (r"layers\.[02]\.kernel$", 1),
        (r"layers\.[02]\.bias$", 0),
        (r"layers\.[13]\.kernel$", 0),
    )
    return StockModel(MLPStack(nnx.Rngs(2)), (x,), rules)
