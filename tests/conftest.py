"""Test set-up: 8 virtual CPU devices unless real accelerators are present.

The XLA flag must be set before JAX initialises its backends, so it is set here, at
import time of the first conftest, before any test module imports JAX.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_xla_flags = os.environ.get("XLA_FLAGS", "")
if os.environ["JAX_PLATFORMS"] == "cpu" and "host_platform_device_count" not in _xla_flags:
    os.environ["XLA_FLAGS"] = f"{_xla_flags} --xla_force_host_platform_device_count=8".strip()

import jax  # noqa: E402
import pytest  # noqa: E402
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
