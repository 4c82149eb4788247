"""The compiler core: IR helpers, tracing a Flax model to a jaxpr, and the pass manager."""

from ligerjax.compiler.pass_manager import PassContext, PassManager, PassReport, VerificationError
from ligerjax.compiler.trace import Traced, trace_module

__all__ = [
    "PassContext",
    "PassManager",
    "PassReport",
    "Traced",
    "VerificationError",
    "trace_module",
]
