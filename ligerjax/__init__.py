"""ligerjax: serve LLMs across several accelerators in JAX, with interleaved parallelism."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public names, imported on first use so that `import ligerjax.ops` stays light.
_LAZY = {
    "LLM": "ligerjax.api",
    "ligerize": "ligerjax.ligerized",
    "Ligerized": "ligerjax.ligerized",
    "Schedule": "ligerjax.plan",
    "SamplingParams": "ligerjax.sampling_params",
    "RequestOutput": "ligerjax.outputs",
    "CompletionOutput": "ligerjax.outputs",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ligerjax' has no attribute {name!r}")
