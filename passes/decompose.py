"""Vertical decomposition: realise the planner's cuts of secondary ops in the jaxpr.

Liger cuts a secondary kernel that is too long for the primary's communication windows
along its batch/sequence dimension, never the hidden one, so each piece runs inside one
window. The interleave planner chose the cuts (the largest head that fits each window);
this pass rewrites the jaxpr to match: an activation × weight ``dot_general`` becomes one
GEMM per piece on a row slice of the activation, then a ``concatenate``; a named attention
call becomes one call per slice of the queries (and their positions), each still
attending to every key; an all-reduce (``psum``, ``pmax``, ``pmin``: elementwise over the
devices) becomes one all-reduce per row slice of its operand. Each piece is traced as one
named ``jit`` equation (``ligerjax_piece``), so every planned op maps to known equations of
the new jaxpr: ``Decomposed.members`` is what the emit pass schedules. The input is never
mutated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from ligerjax.compiler import ir
from ligerjax.compiler.pass_manager import PassReport
from ligerjax.ops import ATTENTION_NAME, attention_params, ligerjax_attention
from ligerjax.schedule import PRIMARY, SECONDARY
from passes.assemble import Assembled, collective_row_dim, row_dim
from passes.interleave import StepPlan

PIECE_NAME = "ligerjax_piece"


@dataclasses.dataclass(frozen=True)
class Decomposed:
    """The rewritten jaxpr, each equation's batch role, and the equations of each planned
    op (``members[role][k]``: op ``k`` of the step plan's ``role`` vector)."""

    jaxpr: ir.ClosedJaxpr
    roles: tuple[str, ...]
    members: Mapping[str, tuple[tuple[int, ...], ...]]
    num_weights: int
    report: PassReport


def _piece_call(fn: Any) -> Any:
    """``fn`` traced as one named jit equation."""
    fn.__name__ = PIECE_NAME
    return jax.jit(fn)


def _row_pieces(eqn: ir.JaxprEqn, dim: int, out_dim: int, spans: Sequence[tuple[int, int]]) -> Any:
    """``eqn`` once per row span of its first operand (the others whole), the pieces
    concatenated along ``out_dim`` of the output."""

    def run(first: Any, *rest: Any) -> list[Any]:
        pieces = []
        for lo, hi in spans:

            def piece(x: Any, *rest: Any, lo: int = lo, hi: int = hi) -> Any:
                part = jax.lax.slice_in_dim(x, lo, hi, axis=dim)
                return ir.bind(eqn.primitive, part, *rest, **eqn.params)[0]

            pieces.append(_piece_call(piece)(first, *rest))
        return [jax.lax.concatenate(pieces, out_dim)]

    return run


def _dot_pieces(eqn: ir.JaxprEqn, dim: int, spans: Sequence[tuple[int, int]]) -> Any:
    (lc, _), (lb, _) = eqn.params["dimension_numbers"]
    ndim = len(ir.aval_of(eqn.invars[0]).shape)
    free = [d for d in range(ndim) if d not in lc and d not in lb]
    return _row_pieces(eqn, dim, len(lb) + free.index(dim), spans)


def _attention_pieces(eqn: ir.JaxprEqn, spans: Sequence[tuple[int, int]]) -> Any:
    causal, scale = attention_params(eqn)

    def run(q: Any, k: Any, v: Any, qpos: Any, lens: Any) -> list[Any]:
        pieces = []
        for lo, hi in spans:

            def piece(q, k, v, qpos, lens, lo: int = lo, hi: int = hi):  # type: ignore[no-untyped-def]
                return ligerjax_attention(
                    jax.lax.slice_in_dim(q, lo, hi, axis=1),
                    k,
                    v,
                    jax.lax.slice_in_dim(qpos, lo, hi, axis=1),
                    lens,
                    causal=causal,
                    sm_scale=scale,
                )

            pieces.append(_piece_call(piece)(q, k, v, qpos, lens))
        return [jax.lax.concatenate(pieces, 1)]

    return run


def decompose(step: StepPlan, axis_env: Sequence[tuple[str, int]]) -> Decomposed:
    """Rewrite ``step.assembled.jaxpr`` so that every cut op of the plan is one equation
    per piece (see the module docstring)."""
    asm: Assembled = step.assembled
    j = asm.jaxpr.jaxpr
    weights = set(j.invars[: asm.num_weights])
    sec_members = asm.members[SECONDARY]
    # Assembled secondary op -> (planned op indices, row spans) of its pieces.
    cuts: dict[int, list[tuple[int, tuple[int, int]]]] = {}
    for k, piece in enumerate(step.pieces):
        if piece.rows is not None:
            cuts.setdefault(piece.op, []).append((k, piece.rows))
    rewrites: dict[int, Any] = {}  # eqn index -> function of its input values
    pieces_of: dict[int, int] = {}  # eqn index -> number of pieces
    for op, parts in cuts.items():
        (i,) = sec_members[op]
        pieces_of[i] = len(parts)
        eqn = j.eqns[i]
        spans = [rows for _, rows in parts]
        if ir.eqn_name(eqn) == ATTENTION_NAME:
            rewrites[i] = _attention_pieces(eqn, spans)
        elif (cdim := collective_row_dim(eqn)) is not None:
            rewrites[i] = _row_pieces(eqn, cdim, cdim, spans)  # elementwise: rows stay put
        else:
            dim = row_dim(eqn, weights)
            if dim is None:
                raise AssertionError(f"decompose: {asm.secondary[op].name} has no row dim")
            rewrites[i] = _dot_pieces(eqn, dim, spans)

    # New equation indices: one per equation, or one per piece plus the concatenate.
    new_index: dict[int, list[int]] = {}
    roles: list[str] = []
    n = 0
    for i in range(len(j.eqns)):
        width = pieces_of[i] + 1 if i in pieces_of else 1
        new_index[i] = list(range(n, n + width))
        roles += [asm.roles[i]] * width
        n += width

    def run(*vals: Any) -> list[Any]:
        env: dict[Any, Any] = dict(zip(j.invars, vals, strict=True))
        env.update(zip(j.constvars, asm.jaxpr.consts, strict=True))

        def read(a: Any) -> Any:
            return a.val if ir.is_literal(a) else env[a]

        for i, eqn in enumerate(j.eqns):
            ins = [read(a) for a in eqn.invars]
            outs = rewrites[i](*ins) if i in rewrites else ir.eval_eqn(eqn, ins)
            env.update(zip(eqn.outvars, outs, strict=True))
        return [read(a) for a in j.outvars]

    avals = [v.aval for v in j.invars]
    new = ir.make_jaxpr(run, *avals, axis_env=axis_env) if rewrites else asm.jaxpr
    if len(new.jaxpr.eqns) != n:
        raise AssertionError(f"decompose: expected {n} equations, traced {len(new.jaxpr.eqns)}")
    members = {
        PRIMARY: tuple(
            tuple(x for i in group for x in new_index[i]) for group in asm.members[PRIMARY]
        ),
        SECONDARY: _secondary_members(step, cuts, new_index),
    }
    report = PassReport(
        name="decompose",
        rewrites={"ops_cut": len(cuts), "pieces": sum(len(p) for p in cuts.values())},
    )
    return Decomposed(
        jaxpr=new,
        roles=tuple(roles),
        members=members,
        num_weights=asm.num_weights,
        report=report,
    )


def _secondary_members(
    step: StepPlan,
    cuts: Mapping[int, list[tuple[int, tuple[int, int]]]],
    new_index: Mapping[int, list[int]],
) -> tuple[tuple[int, ...], ...]:
    asm = step.assembled
    out: list[tuple[int, ...]] = []
    for k, piece in enumerate(step.pieces):
        group = asm.members[SECONDARY][piece.op]
        if piece.rows is None:
            out.append(tuple(x for i in group for x in new_index[i]))
            continue
        (i,) = group
        ks = [kk for kk, _ in cuts[piece.op]]
        p = ks.index(k)
        eqns = [new_index[i][p]]
        if p == len(ks) - 1:
            eqns.append(new_index[i][-1])  # the concatenate joins the last piece
        out.append(tuple(eqns))
    return tuple(out)
