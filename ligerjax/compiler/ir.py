"""The one module that touches JAX's IR internals; everything else goes through these helpers."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
from jax.extend import core as jcore

Primitive = jcore.Primitive
Jaxpr = jcore.Jaxpr
ClosedJaxpr = jcore.ClosedJaxpr
Var = jcore.Var
Literal = jcore.Literal
JaxprEqn = jcore.JaxprEqn

# Parameters of higher-order primitives that hold sub-jaxprs.
_SUBJAXPR_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr", "body_jaxpr", "cond_jaxpr")


def is_literal(atom: Any) -> bool:
    """Whether an equation operand is a literal (a constant written in the jaxpr)."""
    return isinstance(atom, Literal)


def aval_of(atom: Any) -> Any:
    """The abstract value (shape, dtype) of a var or literal."""
    return atom.aval


def new_var(aval: Any) -> Var:
    """A fresh variable of the given abstract value."""
    return Var(aval)


def new_eqn(
    invars: Sequence[Any], outvars: Sequence[Var], primitive: Primitive, params: dict[str, Any]
) -> JaxprEqn:
    """A new equation (no effects)."""
    return jcore.new_jaxpr_eqn(list(invars), list(outvars), primitive, params, jcore.no_effects)


def _debug_info(name: str, n_in: int, n_out: int) -> jcore.DebugInfo:
    return jcore.DebugInfo(
        name,
        None,  # type: ignore[arg-type]  # no source location: the jaxpr is generated
        tuple(f"in{i}" for i in range(n_in)),
        tuple(f"out{i}" for i in range(n_out)),
    )


def rebuild(
    closed: ClosedJaxpr,
    eqns: Sequence[JaxprEqn],
    outvars: Sequence[Any] | None = None,
    invars: Sequence[Var] | None = None,
) -> ClosedJaxpr:
    """A new ClosedJaxpr with the same constants as ``closed`` and the given equations."""
    j = closed.jaxpr
    ins = list(invars if invars is not None else j.invars)
    outs = list(outvars if outvars is not None else j.outvars)
    new = Jaxpr(
        j.constvars,
        ins,
        outs,
        list(eqns),
        j.effects,
        debug_info=_debug_info("ligerjax.rebuild", len(ins), len(outs)),
    )
    return ClosedJaxpr(new, closed.consts)


def jaxpr_fun(closed: ClosedJaxpr) -> Callable[..., list[Any]]:
    """A Python function that evaluates ``closed`` (traceable: works under jit/shard_map)."""
    return jcore.jaxpr_as_fun(closed)


def eval_jaxpr(closed: ClosedJaxpr, *args: Any) -> list[Any]:
    """Evaluate a ClosedJaxpr on arguments; returns the list of outputs."""
    return list(jcore.jaxpr_as_fun(closed)(*args))


def eval_eqn(eqn: JaxprEqn, invals: Sequence[Any]) -> list[Any]:
    """Evaluate one equation on values (as ``eval_jaxpr`` would; works under tracing)."""
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def bind(primitive: Primitive, *args: Any, **params: Any) -> list[Any]:
    """Bind a first-order primitive; always returns a list of outputs."""
    out = primitive.bind(*args, **params)
    return list(out) if primitive.multiple_results else [out]


def sub_jaxprs(eqn: JaxprEqn) -> list[ClosedJaxpr]:
    """The sub-jaxprs of a higher-order equation (pjit, custom_jvp/vjp, scan, cond, while)."""
    out: list[ClosedJaxpr] = []
    for key in _SUBJAXPR_PARAMS:
        sub = eqn.params.get(key)
        if sub is None:
            continue
        out.append(sub if isinstance(sub, ClosedJaxpr) else ClosedJaxpr(sub, []))
    for b in eqn.params.get("branches", ()):
        out.append(b if isinstance(b, ClosedJaxpr) else ClosedJaxpr(b, []))
    return out


def call_jaxpr(eqn: JaxprEqn) -> ClosedJaxpr | None:
    """The body that a call-like equation (jit, custom_jvp_call, custom_vjp_call) evaluates."""
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(key)
        if sub is not None:
            return sub if isinstance(sub, ClosedJaxpr) else ClosedJaxpr(sub, [])
    return None


def iter_eqns(jaxpr: Jaxpr | ClosedJaxpr, recursive: bool = True) -> Iterator[JaxprEqn]:
    """Every equation of a jaxpr, depth-first into sub-jaxprs when ``recursive``."""
    j = jaxpr.jaxpr if isinstance(jaxpr, ClosedJaxpr) else jaxpr
    for eqn in j.eqns:
        yield eqn
        if recursive:
            for sub in sub_jaxprs(eqn):
                yield from iter_eqns(sub, recursive=True)


def count_primitives(jaxpr: Jaxpr | ClosedJaxpr, recursive: bool = True) -> collections.Counter:
    """How often each primitive name occurs."""
    return collections.Counter(e.primitive.name for e in iter_eqns(jaxpr, recursive))


def eqn_name(eqn: JaxprEqn) -> str | None:
    """The ``name`` parameter of a pjit/jit equation (None for other equations)."""
    name = eqn.params.get("name")
    return name if isinstance(name, str) else None


def check_well_formed(jaxpr: Jaxpr | ClosedJaxpr) -> None:
    """Raise ValueError unless every var is defined before use (recursively)."""
    j = jaxpr.jaxpr if isinstance(jaxpr, ClosedJaxpr) else jaxpr
    defined = set(j.constvars) | set(j.invars)
    for i, eqn in enumerate(j.eqns):
        for v in eqn.invars:
            if not is_literal(v) and v not in defined:
                raise ValueError(f"equation {i} ({eqn.primitive.name}) uses undefined var {v}")
        defined.update(eqn.outvars)
        for sub in sub_jaxprs(eqn):
            check_well_formed(sub)
    for v in j.outvars:
        if not is_literal(v) and v not in defined:
            raise ValueError(f"output var {v} is never defined")


_PRIMITIVES: dict[str, Primitive] = {}


def primitive_by_name(name: str) -> Primitive:
    """Look a primitive up by name (from jax.lax and JAX's higher-order modules)."""
    if not _PRIMITIVES:
        from jax._src import custom_derivatives, pjit
        from jax._src.lax import control_flow, lax, parallel, slicing

        for mod in (lax, slicing, control_flow, parallel, pjit, custom_derivatives):
            for attr in vars(mod).values():
                if isinstance(attr, Primitive):
                    _PRIMITIVES.setdefault(attr.name, attr)
    try:
        return _PRIMITIVES[name]
    except KeyError:
        raise ValueError(f"no primitive named {name!r}") from None


def make_jaxpr(
    fun: Callable[..., Any], *avals: Any, axis_env: Sequence[tuple[str, int]] = ()
) -> ClosedJaxpr:
    """Trace ``fun`` at abstract values (optionally with named axes bound) to a ClosedJaxpr."""
    structs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals]
    return jax.make_jaxpr(fun, axis_env=list(axis_env))(*structs)
