"""Vertical decomposition: cut the secondary batch's large ops into window-sized pieces.

Liger cuts a secondary kernel that is too long for the primary's communication windows
along its batch/sequence dimension, never the hidden one, so each piece can run inside
one window. Here that is a jaxpr rewrite: an activation × weight ``dot_general`` becomes
``k`` GEMMs on row slices of the activation and a ``concatenate``; a named attention call
becomes ``k`` calls on slices of the queries (and their positions), each still attending
to every key. The factor ``k`` of each op is the smallest whose piece, inflated by the
compute contention factor, fits the primary's shortest communication window; it is capped
by ``max_factor`` and by ``min_rows`` rows per piece (smaller GEMMs waste the device).

The rewrite re-traces the jaxpr (the input is never mutated): pieces are ordinary
equations, so the assembler sees each piece as an op of its own.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from ligerjax.compiler import ir
from ligerjax.compiler.pass_manager import PassReport
from ligerjax.cost.cost_model import CostModel
from ligerjax.ops import ATTENTION_NAME, ligerjax_attention
from ligerjax.schedule import COMM, SECONDARY, Op
from ligerjax.schedule.function_vector import piece_duration
from passes.assemble import Assembled, row_dim
from passes.tensor_parallel import _probe_attention


@dataclasses.dataclass(frozen=True)
class Decomposed:
    """The rewritten jaxpr and the factor chosen for each decomposed secondary op."""

    jaxpr: ir.ClosedJaxpr
    factors: Mapping[str, int]
    budget_s: float
    report: PassReport


def window_budget(asm: Assembled) -> float:
    """Solo duration of the primary's shortest communication window (0: it has none)."""
    windows = [s.duration_s for s in asm.primary.segments() if s.kind is COMM]
    return min(windows, default=0.0)


def choose_factor(
    op: Op, budget_s: float, cost: CostModel, *, max_factor: int, min_rows: int
) -> int:
    """Smallest k whose pieces of ``op`` (inflated by contention) fit ``budget_s``."""
    f = cost.contention.factor("compute")
    limit = min(max_factor, op.rows // max(min_rows, 1))
    if limit < 2 or op.duration_s * f <= budget_s:
        return 1
    for k in range(2, limit + 1):
        if piece_duration(op, math.ceil(op.rows / k), cost) * f <= budget_s:
            return k
    return limit


def _bounds(rows: int, k: int) -> list[tuple[int, int]]:
    cuts = [round(i * rows / k) for i in range(k + 1)]
    return list(itertools.pairwise(cuts))


def _split_dot(eqn: ir.JaxprEqn, ins: Sequence[Any], dim: int, k: int) -> list[Any]:
    lhs, rhs = ins
    (lc, _), (lb, _) = eqn.params["dimension_numbers"]
    free = [d for d in range(lhs.ndim) if d not in lc and d not in lb]
    out_dim = len(lb) + free.index(dim)
    pieces = [
        ir.bind(eqn.primitive, jax.lax.slice_in_dim(lhs, lo, hi, axis=dim), rhs, **eqn.params)[0]
        for lo, hi in _bounds(lhs.shape[dim], k)
    ]
    return [jax.lax.concatenate(pieces, out_dim)]


def _split_attention(ins: Sequence[Any], k: int, probed: tuple[bool, float]) -> list[Any]:
    q, kk, v, qpos, lens = ins
    causal, scale = probed
    pieces = [
        ligerjax_attention(
            jax.lax.slice_in_dim(q, lo, hi, axis=1),
            kk,
            v,
            jax.lax.slice_in_dim(qpos, lo, hi, axis=1),
            lens,
            causal=causal,
            sm_scale=scale,
        )
        for lo, hi in _bounds(q.shape[1], k)
    ]
    return [jax.lax.concatenate(pieces, 1)]


def decompose(
    asm: Assembled,
    cost: CostModel,
    axis_env: Sequence[tuple[str, int]],
    *,
    budget_s: float | None = None,
    max_factor: int = 16,
    min_rows: int = 16,
) -> Decomposed:
    """Cut every secondary GEMM/attention longer than the window budget into pieces.

    ``budget_s`` defaults to the primary's shortest communication window.
    """
    if max_factor < 1:
        raise ValueError(f"decompose: max_factor={max_factor}: must be >= 1")
    budget = window_budget(asm) if budget_s is None else budget_s
    j = asm.jaxpr.jaxpr
    weights = set(j.invars[: asm.num_weights])
    plan: dict[int, tuple[int, int | None]] = {}  # eqn index -> (k, row dim)
    factors: dict[str, int] = {}
    probes: dict[int, tuple[bool, float]] = {}
    for op, members in zip(asm.secondary, asm.members[SECONDARY], strict=True):
        if not op.splittable or budget <= 0 or len(members) != 1:
            continue
        k = choose_factor(op, budget, cost, max_factor=max_factor, min_rows=min_rows)
        if k < 2:
            continue
        (i,) = members
        eqn = j.eqns[i]
        if ir.eqn_name(eqn) == ATTENTION_NAME:
            probed = _probe_attention(eqn.params["jaxpr"])
            if probed is None:
                continue
            probes[i] = probed
            plan[i] = (k, None)
        else:
            plan[i] = (k, row_dim(eqn, weights))
        factors[op.name] = k

    def run(*vals: Any) -> list[Any]:
        env: dict[Any, Any] = dict(zip(j.invars, vals, strict=True))
        env.update(zip(j.constvars, asm.jaxpr.consts, strict=True))

        def read(a: Any) -> Any:
            return a.val if ir.is_literal(a) else env[a]

        for i, eqn in enumerate(j.eqns):
            ins = [read(a) for a in eqn.invars]
            if i in plan:
                k, dim = plan[i]
                outs = (
                    _split_attention(ins, k, probes[i])
                    if dim is None
                    else _split_dot(eqn, ins, dim, k)
                )
            else:
                outs = ir.eval_eqn(eqn, ins)
            env.update(zip(eqn.outvars, outs, strict=True))
        return [read(a) for a in j.outvars]

    avals = [v.aval for v in j.invars]
    new = ir.make_jaxpr(run, *avals, axis_env=axis_env) if plan else asm.jaxpr
    report = PassReport(
        name="decompose",
        rewrites={"pieces": sum(factors.values()), "ops_decomposed": len(factors)},
    )
    return Decomposed(jaxpr=new, factors=factors, budget_s=budget, report=report)
