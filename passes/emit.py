"""Emit: realise a step plan as one per-device program that XLA will schedule as planned.

XLA's latency-hiding scheduler decides what runs inside a collective's window, and with
shared weights its dot merger fuses the two batches' GEMMs into one (DESIGN.md §3): left
alone, nothing overlaps, or whole secondary layers land inside a tiny primary window. The
emitter therefore ties each window into the data flow with two ``optimization_barrier``s,
Liger's event synchronisation expressed inside one program (no host round trip):

```
a_p, x_s = optimization_barrier((a_p, x_s))   # the window opens: both batches' inputs ready
r_p = psum(a_p, "tp")                         # the primary's collective: start ... done
y_s = piece(x_s)                              # the secondary work planned for this window
r_p, y_s = optimization_barrier((r_p, y_s))   # the window closes: both continue after it
```

The first barrier holds the piece until the primary reaches its collective; the second
keeps the piece inside the window and stops the dot merger from pulling pieces of
different windows together (they are no longer independent). The secondary work no
window took (the tail) is tied to the primary's results, so that XLA's all-reduce
combiner cannot merge a primary collective with a secondary one (measured on the
A100-PCIe plan of the 7B-like step: the merged all-reduce was synchronous and ~14× as
long). Compute windows filled with secondary collectives are tied the same way. Every
equation is traced under ``jax.named_scope("primary" | "secondary")``, so the compiled
HLO's ``op_name`` metadata tells the batches apart when the schedule is read back.

``barriers=False`` emits the same equations in the same order without ties: the program
XLA schedules on its own, against which the measures are judged.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

import jax

from ligerjax.compiler import ir
from ligerjax.compiler.pass_manager import PassReport
from ligerjax.schedule import PRIMARY, SECONDARY
from passes.assemble import SHARED, Uses
from passes.decompose import Decomposed
from passes.interleave import StepPlan

PRIMARY_SCOPE = "primary"
SECONDARY_SCOPE = "secondary"


@dataclasses.dataclass(frozen=True)
class Emitted:
    """The per-device program of the interleaved step (invars/outvars as the input's)."""

    jaxpr: ir.ClosedJaxpr
    barriers: bool
    report: PassReport


@dataclasses.dataclass(frozen=True)
class _Group:
    primary: tuple[int, ...]
    secondary: tuple[int, ...]

    @property
    def tied(self) -> bool:
        return bool(self.primary) and bool(self.secondary)


def _groups(dec: Decomposed, step: StepPlan) -> list[_Group]:
    """Equation indices of each window (shared equations go to the prologue), then the tail."""
    prim, sec = dec.members[PRIMARY], dec.members[SECONDARY]

    def eqns(members: Sequence[tuple[int, ...]], ops: Sequence[int], role: str) -> tuple[int, ...]:
        flat = itertools.chain.from_iterable(members[k] for k in ops)
        return tuple(sorted(i for i in flat if dec.roles[i] == role))

    shared = tuple(i for i, r in enumerate(dec.roles) if r == SHARED)
    out = [_Group(shared, ())]
    for w in step.windows:
        out.append(
            _Group(eqns(prim, w.primary_ops, PRIMARY), eqns(sec, w.secondary_ops, SECONDARY))
        )
    out.append(_Group((), eqns(sec, step.tail, SECONDARY)))
    return out


def emit(
    dec: Decomposed,
    step: StepPlan,
    axis_env: Sequence[tuple[str, int]],
    *,
    barriers: bool = True,
) -> Emitted:
    """The interleaved per-device jaxpr of ``step`` over the decomposed ``dec`` (see the
    module docstring)."""
    closed = dec.jaxpr
    j = closed.jaxpr
    weights = set(j.invars[: dec.num_weights])
    uses = Uses(j)
    groups = _groups(dec, step)
    primary_results = [
        v for v in j.outvars if not ir.is_literal(v) and v in _defined_by(j, dec, PRIMARY)
    ]
    emitted = [i for g in groups for i in (*g.primary, *g.secondary)]
    if sorted(emitted) != list(range(len(j.eqns))):
        raise AssertionError("emit: the plan does not cover every equation exactly once")
    ties = 0

    def run(*vals: Any) -> list[Any]:
        nonlocal ties
        env: dict[Any, Any] = dict(zip(j.invars, vals, strict=True))
        env.update(zip(j.constvars, closed.consts, strict=True))

        def read(a: Any) -> Any:
            return a.val if ir.is_literal(a) else env[a]

        def tie(vs: list[Any]) -> None:
            if vs:
                out = jax.lax.optimization_barrier(tuple(env[v] for v in vs))
                env.update(zip(vs, out, strict=True))

        for g in groups:
            members = set(g.primary) | set(g.secondary)
            tied = barriers and g.tied
            if tied:
                ties += 1
                tie(_live_in(j, members, weights))
            elif barriers and g is groups[-1] and g.secondary:
                # The tail starts once the primary's results exist: otherwise XLA's
                # all-reduce combiner may merge a primary collective with the tail's, and
                # the primary waits for the secondary's communication.
                ties += 1
                tie([*primary_results, *_live_in(j, members, weights)])
            for scope, idx in ((PRIMARY_SCOPE, g.primary), (SECONDARY_SCOPE, g.secondary)):
                with jax.named_scope(scope):
                    for i in idx:
                        eqn = j.eqns[i]
                        outs = ir.eval_eqn(eqn, [read(a) for a in eqn.invars])
                        env.update(zip(eqn.outvars, outs, strict=True))
            if tied:
                tie(_live_out(j, members, uses))
        return [read(a) for a in j.outvars]

    new = ir.make_jaxpr(run, *[v.aval for v in j.invars], axis_env=axis_env)
    report = PassReport(name="emit", rewrites={"windows_tied": ties, "barriers": 2 * ties})
    return Emitted(jaxpr=new, barriers=barriers, report=report)


def _defined_by(j: ir.Jaxpr, dec: Decomposed, role: str) -> set[Any]:
    return {v for i, e in enumerate(j.eqns) if dec.roles[i] == role for v in e.outvars}


def _live_in(j: ir.Jaxpr, members: set[int], weights: set[Any]) -> list[Any]:
    """Vars the group reads that were defined before it (weights excluded), in order."""
    defined = {v for i in members for v in j.eqns[i].outvars}
    seen: dict[Any, None] = {}
    for i in sorted(members):
        for v in j.eqns[i].invars:
            if not ir.is_literal(v) and v not in defined and v not in weights:
                seen.setdefault(v, None)
    consts = set(j.constvars)
    return [v for v in seen if v not in consts]


def _live_out(j: ir.Jaxpr, members: set[int], uses: Uses) -> list[Any]:
    """Vars the group defines that are read after it or returned, in order."""
    return [v for i in sorted(members) for v in j.eqns[i].outvars if uses.escapes(v, members)]
