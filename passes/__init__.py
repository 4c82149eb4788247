"""Compiler passes over traced jaxprs (one pass per module)."""

from passes.attention import AttentionProgram, attention, attention_pass
from passes.partition_rules import DEFAULT_RULES, resolve_split
from passes.pipeline import PPProgram, pipeline, pipeline_pass, stage_cuts
from passes.tensor_parallel import TPProgram, tensor_parallel, tensor_parallel_pass

__all__ = [
    "DEFAULT_RULES",
    "AttentionProgram",
    "PPProgram",
    "TPProgram",
    "attention",
    "attention_pass",
    "pipeline",
    "pipeline_pass",
    "resolve_split",
    "stage_cuts",
    "tensor_parallel",
    "tensor_parallel_pass",
]
