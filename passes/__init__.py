"""Compiler passes over traced jaxprs (one pass per module)."""

from passes.partition_rules import DEFAULT_RULES, resolve_split
from passes.tensor_parallel import TPProgram, tensor_parallel, tensor_parallel_pass

__all__ = ["DEFAULT_RULES", "TPProgram", "resolve_split", "tensor_parallel", "tensor_parallel_pass"]
