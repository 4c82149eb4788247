"""The attention pass: every attention of a traced program becomes one named kernel call.

Two rewrites, both into a ``ligerjax_attention`` call (``ligerjax.ops``), whose body runs the
kernels' dispatching entry point (Pallas flash attention when lowered for a GPU, the blockwise
pure-JAX fallback on CPU) and carries ``(causal, sm_scale)`` in the jaxpr
(:func:`ligerjax.ops.attention_params`):

* **routed** — an existing ``ligerjax_attention`` equation is re-emitted through
  :func:`ligerjax.ops.ligerjax_attention` with the knobs read from the jaxpr.
* **softmax_qkv_matched** — a hand-written ``softmax(Q·Kᵀ·scale + mask)·V`` subgraph
  (stock ``flax.nnx.MultiHeadAttention``, ``jax.nn.dot_product_attention(implementation=
  "xla")``, einsum code) is replaced by the call. The subgraph is read forward from a
  ``dot_general`` over the head dim: scale multiplies/divides by a constant (also on ``q`` or
  ``k`` before the dot), transposes, reshapes of unit dims, casts, ``select_n`` against a
  constant fill ``<= -1e9`` or an additive constant bias of 0/``<= -1e9`` (the mask), then a
  softmax (``reduce_max``, ``sub``, ``exp``, ``reduce_sum``, ``div``), then the
  ``dot_general`` with ``v``. Helper calls on the way (``jnp.where``'s ``pjit``, custom_jvp
  wrappers) are looked through. The mask must be a constant of the program (it depends on no
  input: iotas, ``make_causal_mask``, ``tril``); it is evaluated here and must be all-true
  (``causal=False``) or ``s <= t + c`` with ``c >= 0`` (``causal=True``, query ``t`` at
  position ``t + c``). Nothing is rewritten when an intermediate of the subgraph is used
  outside it, when the mask is anything else (no masked-attention kernel yet), for GQA
  written by hand or a value head dim unlike the key's; those are counted as fallbacks.

The pass is a pure function over the jaxpr: a rule per primitive, the default copies the
equation, higher-order equations get their sub-jaxprs rewritten; the input is never mutated.
Its result is a :class:`~ligerjax.compiler.Traced` (so later passes take it unchanged) whose
call evaluates the rewritten jaxpr.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ligerjax import ops
from ligerjax.compiler import ir
from ligerjax.compiler.pass_manager import PassContext, PassReport
from ligerjax.compiler.trace import Traced

LARGE_NEGATIVE = -1e9  # a fill at or below this masks: exp(fill - max) is 0 in every float
_MAX_MASK_ELEMENTS = 1 << 24  # larger constant masks are not evaluated (not matched)
_INLINED = ("pjit", "jit", "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr")


@dataclasses.dataclass
class _Run:
    """Mutable bookkeeping of one pass run (never shared between runs)."""

    rewrites: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    fallbacks: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    memo: dict[int, tuple[ir.ClosedJaxpr, collections.Counter, collections.Counter]] = (
        dataclasses.field(default_factory=dict)
    )


# ---------------------------------------------------------------------------------------------
# a flat view of one jaxpr level: helper calls inlined, for reading subgraphs across them


@dataclasses.dataclass
class _Flat:
    eqns: list[ir.JaxprEqn]  # analysis copies: inlined bodies get fresh internal vars
    top: list[int]  # the equation of the level each flat equation comes from
    inlined: list[bool]  # whether it sits inside an inlined call
    consts: dict[Any, Any]  # constvars (of the level and of inlined bodies) -> value
    outvars: set[Any]  # the level's output vars
    visible: set[Any]  # vars of the level itself (invars, constvars, equation outputs)
    producer: dict[Any, int] = dataclasses.field(default_factory=dict)
    users: dict[Any, list[int]] = dataclasses.field(default_factory=dict)
    values: dict[Any, Any] = dataclasses.field(default_factory=dict)  # evaluated constants

    def __post_init__(self) -> None:
        for i, e in enumerate(self.eqns):
            for v in e.outvars:
                self.producer[v] = i
            for a in e.invars:
                if not ir.is_literal(a):
                    self.users.setdefault(a, []).append(i)

    def uses(self, v: Any) -> list[int]:
        return self.users.get(v, [])

    def producer_eqn(self, v: Any) -> ir.JaxprEqn | None:
        i = self.producer.get(v)
        return None if i is None else self.eqns[i]

    def const(self, atom: Any) -> np.ndarray | None:
        """The value of ``atom`` if it depends on no input of the program (else None)."""
        if ir.is_literal(atom):
            return np.asarray(atom.val)
        if atom in self.consts:
            return np.asarray(self.consts[atom])
        if atom in self.values:
            return self.values[atom]
        todo, order = [atom], []
        while todo:  # the constant's backward slice, without recursion
            v = todo.pop()
            if v in self.values or v in self.consts or v in order:
                continue
            eqn = self.producer_eqn(v)
            if eqn is None or eqn.effects:
                self.values[atom] = None
                return None
            order.append(v)
            todo += [a for a in eqn.invars if not ir.is_literal(a)]
        for v in sorted(order, key=self.producer.__getitem__):
            if v in self.values:
                continue
            eqn = self.eqns[self.producer[v]]
            ins = [
                self.const(a) if ir.is_literal(a) or a in self.consts else self.values[a]
                for a in eqn.invars
            ]
            if any(x is None for x in ins) or sum(math.prod(x.shape) for x in ins) > (
                _MAX_MASK_ELEMENTS
            ):
                outs = [None] * len(eqn.outvars)
            else:
                outs = [np.asarray(o) for o in ir.eval_eqn(eqn, ins)]
            for o, val in zip(eqn.outvars, outs, strict=True):
                self.values[o] = val
        return self.values[atom]


def _inlinable(eqn: ir.JaxprEqn) -> ir.ClosedJaxpr | None:
    if eqn.primitive.name not in _INLINED or ops.is_attention(eqn):
        return None
    body = ir.call_jaxpr(eqn)
    if body is None or len(body.jaxpr.invars) != len(eqn.invars):
        return None
    outs = body.jaxpr.outvars
    defined = {v for e in body.jaxpr.eqns for v in e.outvars}
    if any(ir.is_literal(v) or v not in defined for v in outs) or len(set(outs)) != len(outs):
        return None
    return body


def _flatten(closed: ir.ClosedJaxpr) -> _Flat:
    jaxpr = closed.jaxpr
    eqns: list[ir.JaxprEqn] = []
    top: list[int] = []
    inlined: list[bool] = []
    consts = dict(zip(jaxpr.constvars, closed.consts, strict=True))

    def emit(eqn: ir.JaxprEqn, t: int, inner: bool) -> None:
        body = _inlinable(eqn)
        if body is None:
            eqns.append(eqn)
            top.append(t)
            inlined.append(inner)
            return
        env: dict[Any, Any] = dict(zip(body.jaxpr.invars, eqn.invars, strict=True))
        env.update(zip(body.jaxpr.outvars, eqn.outvars, strict=True))
        for cv, c in zip(body.jaxpr.constvars, body.consts, strict=True):
            env[cv] = ir.new_var(cv.aval)
            consts[env[cv]] = c
        for e in body.jaxpr.eqns:
            ins = [a if ir.is_literal(a) else env[a] for a in e.invars]
            for v in e.outvars:
                env.setdefault(v, ir.new_var(v.aval))
            outs = [env[v] for v in e.outvars]
            emit(ir.new_eqn(ins, outs, e.primitive, e.params), t, True)

    for t, eqn in enumerate(jaxpr.eqns):
        emit(eqn, t, False)
    visible = set(jaxpr.invars) | set(jaxpr.constvars) | {v for e in jaxpr.eqns for v in e.outvars}
    outvars = {v for v in jaxpr.outvars if not ir.is_literal(v)}
    return _Flat(eqns, top, inlined, consts, outvars, visible)


# ---------------------------------------------------------------------------------------------
# reading a softmax(QKᵀ)V subgraph


class _NoMatch(Exception):
    """The subgraph is an attention but cannot be rewritten; ``args[0]`` names the reason."""


Roles = dict[str, int | None]  # role -> axis; None: the role has size 1 and no axis


@dataclasses.dataclass(frozen=True)
class _View:
    """A value whose axes play roles (``B``, ``T``, ``H``, ``D``, ...); other axes are 1."""

    var: Any
    roles: Roles

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.var.aval.shape)

    def size(self, role: str) -> int:
        axis = self.roles.get(role)
        return 1 if axis is None else self.shape[axis]


def _unit_reshape(src: tuple[int, ...], dst: tuple[int, ...], roles: Roles) -> Roles | None:
    """Roles of ``src``'s axes carried to ``dst`` when the reshape only adds/drops 1s."""
    src_big = [i for i, n in enumerate(src) if n != 1]
    dst_big = [i for i, n in enumerate(dst) if n != 1]
    if [src[i] for i in src_big] != [dst[i] for i in dst_big]:
        return None
    where = dict(zip(src_big, dst_big, strict=True))
    return {r: None if a is None else where.get(a) for r, a in roles.items()}


def _view_forward(eqn: ir.JaxprEqn, x: _View) -> _View | None:
    """``x`` through a transpose, a reshape of unit axes or a float cast (else None)."""
    name, out = eqn.primitive.name, eqn.outvars[0]
    if len(eqn.invars) != 1 or eqn.invars[0] is not x.var:
        return None
    if name == "transpose":
        perm = tuple(eqn.params["permutation"])
        return _View(out, {r: None if a is None else perm.index(a) for r, a in x.roles.items()})
    if name == "reshape" and eqn.params.get("dimensions") is None:
        roles = _unit_reshape(x.shape, tuple(out.aval.shape), x.roles)
        return None if roles is None else _View(out, roles)
    if name == "convert_element_type" and jnp.issubdtype(out.aval.dtype, jnp.floating):
        return _View(out, x.roles)
    return None


def _uniform(x: np.ndarray | None) -> float | None:
    """The one value of a constant float array whose elements are all equal (else None)."""
    if x is None or x.size == 0 or not np.issubdtype(x.dtype, np.floating):
        return None
    first = x.reshape(-1)[0]
    return float(first) if np.all(x == first) else None


def _scale_of(flat: _Flat, eqn: ir.JaxprEqn, var: Any) -> float | None:
    """The factor by which ``eqn`` (``var`` times or over a constant) scales ``var``."""
    name = eqn.primitive.name
    if name not in ("mul", "div") or len(eqn.invars) != 2 or var not in eqn.invars:
        return None
    a, b = eqn.invars
    if (name == "div" and a is not var) or a is b:
        return None
    if tuple(var.aval.shape) != tuple(eqn.outvars[0].aval.shape):
        return None
    c = _uniform(flat.const(b if a is var else a))
    if c is None or c == 0 or not math.isfinite(c):
        return None
    return 1.0 / c if name == "div" else c


def _peel_input(flat: _Flat, view: _View) -> tuple[_View, float]:
    """Walk an operand back through views and constant scales; the last var of this level."""
    scale, best = 1.0, (view, 1.0)
    while (eqn := flat.producer_eqn(view.var)) is not None:
        name = eqn.primitive.name
        src = eqn.invars[0]
        if name == "transpose":
            perm = tuple(eqn.params["permutation"])
            view = _View(src, {r: None if a is None else perm[a] for r, a in view.roles.items()})
        elif name == "reshape" and eqn.params.get("dimensions") is None:
            roles = _unit_reshape(view.shape, tuple(src.aval.shape), view.roles)
            if roles is None or ir.is_literal(src):
                break
            view = _View(src, roles)
        elif (c := _scale_of(flat, eqn, src)) is not None and not ir.is_literal(src):
            view, scale = _View(src, view.roles), scale * c
        elif name == "mul" and (c := _scale_of(flat, eqn, eqn.invars[1])) is not None:
            view, scale = _View(eqn.invars[1], view.roles), scale * c
        else:
            break
        if view.var in flat.visible:
            best = (view, scale)
    return best


def _dims(eqn: ir.JaxprEqn) -> tuple[tuple[int, ...], ...]:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    return tuple(lc), tuple(rc), tuple(lb), tuple(rb)


def _free(ndim: int, *used: tuple[int, ...]) -> list[int]:
    return [d for d in range(ndim) if not any(d in u for u in used)]


def _main_axis(shape: tuple[int, ...], free: list[int]) -> int | None:
    """The one free axis of size > 1 (or the only free axis); None if several or none."""
    big = [d for d in free if shape[d] != 1]
    if len(big) == 1:
        return big[0]
    return free[0] if not big and len(free) == 1 else None


class _Walk:
    """The equations of a subgraph taken so far, read forward over a flat view."""

    def __init__(self, flat: _Flat, start: int):
        self.flat, self.eqns = flat, [start]

    def take(self, i: int) -> ir.JaxprEqn:
        self.eqns.append(i)
        return self.flat.eqns[i]

    def user(self, var: Any, name: str) -> int | None:
        """The one user of ``var`` with primitive ``name`` (None if none or several)."""
        uses = [i for i in self.flat.uses(var) if self.flat.eqns[i].primitive.name == name]
        return uses[0] if len(uses) == 1 else None


def _row_stat(
    walk: _Walk, reduced: Any, base: tuple[int, ...], axis: int, target: tuple[int, ...]
) -> Any:
    """Follow ``reduced`` (``base`` reduced over ``axis``) through keepdims, transposes,
    broadcasts and stop_gradient to a value aligned with a consumer whose axes are ``target``
    (each an axis of ``base``); that var, or None."""
    flat, cur = walk.flat, reduced
    src: list[int | None] = [d for d in range(len(base)) if d != axis]  # base axis of each
    while len(uses := flat.uses(cur)) == 1:
        eqn = flat.eqns[uses[0]]
        name, out = eqn.primitive.name, eqn.outvars[0]
        s_in, s_out = tuple(cur.aval.shape), tuple(out.aval.shape)
        if len(eqn.invars) == 2 and name == "max":  # jnp.max(..., initial=-inf)
            other = eqn.invars[1] if eqn.invars[0] is cur else eqn.invars[0]
            if _uniform(flat.const(other)) != -math.inf or s_out != s_in:
                break
        elif name == "transpose":
            src = [src[a] for a in eqn.params["permutation"]]
        elif name == "broadcast_in_dim" and len(eqn.invars) == 1:
            new: list[int | None] = [None] * len(s_out)
            for j, d in enumerate(eqn.params["broadcast_dimensions"]):
                new[d] = src[j]
            src = new
        elif name == "reshape" and eqn.params.get("dimensions") is None:
            where = _unit_reshape(s_in, s_out, {str(j): j for j in range(len(s_in))})
            if where is None:
                break
            new = [None] * len(s_out)
            for j in range(len(s_in)):
                if where[str(j)] is not None:
                    new[where[str(j)]] = src[j]
            src = new
        elif name != "stop_gradient":
            break
        walk.take(uses[0])
        cur = out
    shape = tuple(cur.aval.shape)
    if len(shape) != len(target):
        return None
    for i, t in enumerate(target):
        if src[i] == t or (src[i] is None and t == axis) or (shape[i] == 1 and base[t] == 1):
            continue
        return None
    return cur


def _softmax(walk: _Walk, x: _View) -> tuple[_View, str] | None:
    """``softmax(x)`` over the ``lhs`` or ``rhs`` axis of ``x``: (probabilities, that role).

    The normalised tensor may be ``x`` or a transpose of it (``jnp`` broadcasting moves axes).
    """
    flat = walk.flat
    i_max = walk.user(x.var, "reduce_max")
    if i_max is None:
        return None
    axes = tuple(flat.eqns[i_max].params["axes"])
    role = next(
        (r for r in ("lhs", "rhs") if x.roles[r] is not None and axes == (x.roles[r],)), None
    )
    if role is None:
        return None
    axis = x.roles[role]
    m_red = walk.take(i_max).outvars[0]
    ys = [(x, tuple(range(len(x.shape))))]
    for i in flat.uses(x.var):
        eqn = flat.eqns[i]
        if eqn.primitive.name == "transpose" and (y := _view_forward(eqn, x)) is not None:
            ys.append((y, tuple(eqn.params["permutation"])))
    for y, y_src in ys:
        i_sub = walk.user(y.var, "sub")
        if i_sub is None or flat.eqns[i_sub].invars[0] is not y.var:
            continue
        if y is not x:
            walk.take(flat.producer[y.var])
        m = _row_stat(walk, m_red, x.shape, axis, y_src)
        if m is None or flat.eqns[i_sub].invars != [y.var, m]:
            return None
        d = walk.take(i_sub).outvars[0]
        i_exp = walk.user(d, "exp")
        if i_exp is None:
            return None
        e = walk.take(i_exp).outvars[0]
        y_axis = y.roles[role]
        i_sum = walk.user(e, "reduce_sum")
        if i_sum is None or tuple(flat.eqns[i_sum].params["axes"]) != (y_axis,):
            return None
        ident = tuple(range(len(y.shape)))
        z = _row_stat(walk, walk.take(i_sum).outvars[0], y.shape, y_axis, ident)
        i_div = walk.user(e, "div")
        if z is None or i_div is None or flat.eqns[i_div].invars != [e, z]:
            return None
        return _View(walk.take(i_div).outvars[0], y.roles), role
    return None


_UNKNOWN_MASK = "unknown"


def _mask_2d(keep: np.ndarray, x: _View) -> np.ndarray | str:
    """A constant keep-mask over ``x`` as [lhs, rhs]; _UNKNOWN_MASK if it varies elsewhere."""
    keep = np.broadcast_to(keep, x.shape)
    lhs, rhs = x.roles["lhs"], x.roles["rhs"]
    index = tuple(slice(None) if d in (lhs, rhs) else slice(0, 1) for d in range(keep.ndim))
    if not np.array_equal(np.broadcast_to(keep[index], keep.shape), keep):
        return _UNKNOWN_MASK
    small = keep[tuple(slice(None) if d in (lhs, rhs) else 0 for d in range(keep.ndim))]
    if lhs is None:
        small = small[None, :]
    if rhs is None:
        small = small[:, None]
    if lhs is not None and rhs is not None and lhs > rhs:
        small = small.T
    return small


def _and(a: np.ndarray | str | None, b: np.ndarray | str) -> np.ndarray | str:
    if a is None:
        return b
    if isinstance(a, str) or isinstance(b, str):
        return _UNKNOWN_MASK
    return a & b


def _logit_step(walk: _Walk, x: _View, keep: Any) -> tuple[_View, float, Any] | None:
    """One step along the logits: (new view, scale factor, keep-mask), None at the end."""
    flat = walk.flat
    for i in flat.uses(x.var):
        eqn = flat.eqns[i]
        name, out = eqn.primitive.name, eqn.outvars[0] if eqn.outvars else None
        if (c := _scale_of(flat, eqn, x.var)) is not None:
            walk.take(i)
            return _View(out, x.roles), c, keep
        if (view := _view_forward(eqn, x)) is not None:
            walk.take(i)
            return view, 1.0, keep
        if name == "select_n" and len(eqn.invars) == 3 and x.var in eqn.invars[1:]:
            pred, on_false, on_true = eqn.invars
            if on_false is on_true or tuple(out.aval.shape) != x.shape:
                continue
            fill = on_false if on_true is x.var else on_true
            mask, fill_val = flat.const(pred), flat.const(fill)
            walk.take(i)
            if mask is None or fill_val is None or mask.dtype != np.bool_:
                return _View(out, x.roles), 1.0, _UNKNOWN_MASK
            if np.max(fill_val, initial=-math.inf) > LARGE_NEGATIVE:
                return _View(out, x.roles), 1.0, _UNKNOWN_MASK
            mask = mask if on_true is x.var else ~mask
            return _View(out, x.roles), 1.0, _and(keep, _mask_2d(mask, x))
        if name == "add" and len(eqn.invars) == 2 and tuple(out.aval.shape) == x.shape:
            other = eqn.invars[1] if eqn.invars[0] is x.var else eqn.invars[0]
            bias = flat.const(other)
            walk.take(i)
            if bias is None or not np.all((bias == 0) | (bias <= LARGE_NEGATIVE)):
                return _View(out, x.roles), 1.0, _UNKNOWN_MASK
            return _View(out, x.roles), 1.0, _and(keep, _mask_2d(bias == 0, x))
    return None


def _causal_offset(keep: np.ndarray | None) -> tuple[bool, int] | None:
    """(causal, c) for a [T, S] keep-mask ``s <= t + c`` with ``c >= 0``; None otherwise."""
    if keep is None or keep.all():
        return False, 0
    T, S = keep.shape
    c = int(np.argmin(keep[0])) - 1
    want = np.arange(S)[None, :] <= np.arange(T)[:, None] + c
    if c < 0 or not np.array_equal(keep, want):
        return None
    return True, c


@dataclasses.dataclass(frozen=True)
class _Match:
    q: _View  # roles B, T, H, D
    k: _View  # roles B, S, H, D
    v: _View  # roles B, S, H, D
    out: _View  # roles B, T, H, D: the var the subgraph ends in
    eqns: tuple[int, ...]  # flat equations of the subgraph
    causal: bool
    offset: int  # query t sits at position t + offset
    sm_scale: float


def _qk_view(var: Any, batch: tuple[int, ...], contract: int, main: int, seq: str) -> _View:
    """q (``seq`` T) or k (S) of the Q·Kᵀ dot: batch axes are (B, H), or H alone."""
    names = ("B", "H") if len(batch) == 2 else ("H",)
    return _View(var, {"B": None, **dict(zip(names, batch, strict=True)), seq: main, "D": contract})


def _match(flat: _Flat, i_qk: int) -> _Match | None:
    """Read the softmax(QKᵀ)V subgraph that starts at the dot ``i_qk`` (None: it is not one).

    Raises _NoMatch(reason) for an attention that cannot be rewritten.
    """
    qk = flat.eqns[i_qk]
    lhs, rhs = qk.invars
    if ir.is_literal(lhs) or ir.is_literal(rhs):
        return None
    lc, rc, lb, rb = _dims(qk)
    if len(lc) != 1 or len(lb) not in (1, 2):
        return None
    lshape, rshape = tuple(lhs.aval.shape), tuple(rhs.aval.shape)
    lfree, rfree = _free(len(lshape), lc, lb), _free(len(rshape), rc, rb)
    lmain, rmain = _main_axis(lshape, lfree), _main_axis(rshape, rfree)
    if lmain is None or rmain is None:
        return None
    n_b = len(lb)
    batch_roles = [f"b{j}" for j in range(n_b)]
    logit_roles: Roles = {r: j for j, r in enumerate(batch_roles)}
    logit_roles["lhs"] = n_b + lfree.index(lmain)
    logit_roles["rhs"] = n_b + len(lfree) + rfree.index(rmain)
    walk = _Walk(flat, i_qk)
    x, scale, keep = _View(qk.outvars[0], logit_roles), 1.0, None
    while True:
        probe = _Walk(flat, i_qk)
        soft = _softmax(probe, x)
        if soft is not None:
            walk.eqns += probe.eqns[1:]
            break
        step = _logit_step(walk, x, keep)
        if step is None:
            return None  # no softmax follows: not an attention
        x, c, keep = step
        scale *= c
    p, s_role = soft
    t_role = "lhs" if s_role == "rhs" else "rhs"
    if isinstance(keep, str):
        raise _NoMatch("mask_not_causal")
    mask = _causal_offset(None if keep is None else (keep if t_role == "lhs" else keep.T))
    if mask is None:
        raise _NoMatch("mask_not_causal")
    # probabilities -> the P·V dot, through views and casts
    while len(uses := flat.uses(p.var)) == 1 and flat.eqns[uses[0]].primitive.name != "dot_general":
        view = _view_forward(flat.eqns[uses[0]], p)
        if view is None:
            break
        walk.take(uses[0])
        p = view
    if len(uses) != 1 or flat.eqns[uses[0]].primitive.name != "dot_general":
        raise _NoMatch("intermediate_escapes" if len(uses) > 1 else "layout")
    pv = walk.take(uses[0])
    p_is_lhs = pv.invars[0] is p.var
    v_var = pv.invars[1] if p_is_lhs else pv.invars[0]
    if ir.is_literal(v_var) or v_var is p.var:
        raise _NoMatch("layout")
    lc2, rc2, lb2, rb2 = _dims(pv)
    pc, vc, pb, vb = (lc2, rc2, lb2, rb2) if p_is_lhs else (rc2, lc2, rb2, lb2)
    role_of = {a: r for r, a in p.roles.items() if a is not None}
    if pc != (p.roles[s_role],) or len(vc) != 1:
        raise _NoMatch("layout")
    if any(role_of.get(a) not in batch_roles for a in pb) or any(
        p.roles[r] is not None and p.roles[r] not in pb for r in batch_roles
    ):
        raise _NoMatch("layout")
    pfree = _free(len(p.shape), pc, pb)
    if any(a != p.roles[t_role] and p.shape[a] != 1 for a in pfree):
        raise _NoMatch("layout")
    vshape = tuple(v_var.aval.shape)
    vfree = _free(len(vshape), vc, vb)
    v_d = _main_axis(vshape, vfree)
    if v_d is None:
        raise _NoMatch("layout")
    # role names of q/k/v/out: the batch roles are (B, H), or H alone
    names = dict(zip(batch_roles, ("B", "H") if n_b == 2 else ("H",), strict=True))
    v_roles: Roles = {"B": None, "S": vc[0], "D": v_d}
    v_roles.update({names[role_of[a]]: b for a, b in zip(pb, vb, strict=True)})
    v_roles.update({names[r]: None for r in batch_roles if names[r] not in v_roles})
    out_axes = [names[role_of[a]] for a in pb]
    p_free = ["T" if a == p.roles[t_role] else None for a in pfree]
    v_free = ["D" if a == v_d else None for a in vfree]
    out_axes += p_free + v_free if p_is_lhs else v_free + p_free
    out_roles: Roles = {"B": None, "H": None, "T": None, "D": None}
    out_roles.update({r: a for a, r in enumerate(out_axes) if r is not None})
    out = _View(pv.outvars[0], out_roles)
    while out.var not in flat.outvars and len(uses := flat.uses(out.var)) == 1:
        eqn = flat.eqns[uses[0]]
        view = _view_forward(eqn, out)
        if view is None or eqn.primitive.name == "convert_element_type":
            break
        walk.take(uses[0])
        out = view
    # q and k from the Q·Kᵀ dot, each walked back to a var of this level
    sides = {"lhs": (lhs, lb, lc[0], lmain), "rhs": (rhs, rb, rc[0], rmain)}
    q, q_scale = _peel_input(flat, _qk_view(*sides[t_role], "T"))
    k, k_scale = _peel_input(flat, _qk_view(*sides[s_role], "S"))
    v, _ = _peel_input(flat, _View(v_var, v_roles))
    if q.size("D") != v.size("D"):
        raise _NoMatch("layout")
    causal, offset = mask
    return _Match(q, k, v, out, tuple(walk.eqns), causal, offset, scale * q_scale * k_scale)


def _check_rewritable(flat: _Flat, m: _Match, taken: set[int], finals: set[Any]) -> set[int]:
    """The equations of the level the match deletes; raises _NoMatch if it cannot be cut out."""
    inside = set(m.eqns)
    final = m.out.var
    inner = {v for i in m.eqns for v in flat.eqns[i].outvars} - {final}
    for v in inner:
        if v in flat.outvars or any(u not in inside for u in flat.uses(v)):
            raise _NoMatch("intermediate_escapes")
    tops = {flat.top[i] for i in m.eqns}
    if tops & taken:
        raise _NoMatch("overlaps")
    if final not in flat.visible:
        raise _NoMatch("not_at_this_level")
    for view in (m.q, m.k, m.v):
        src = flat.producer.get(view.var)
        if (src is not None and flat.top[src] in tops) or (
            view.var not in flat.visible and view.var not in finals
        ):
            raise _NoMatch("not_at_this_level")
    return tops


# ---------------------------------------------------------------------------------------------
# emitting the replacement


def _to_bthd(x: jax.Array, roles: Roles, order: str) -> jax.Array:
    """``x`` as [B, T|S, H, D] (``order`` names the roles), unit axes dropped or added."""
    present = [r for r in order if roles.get(r) is not None]
    perm = [roles[r] for r in present]
    perm += [a for a in range(x.ndim) if a not in perm]
    if perm != list(range(x.ndim)):
        x = jnp.transpose(x, perm)
    shape = tuple(x.shape[present.index(r)] if r in present else 1 for r in order)
    return x.reshape(shape) if x.shape != shape else x


def _from_bthd(o: jax.Array, roles: Roles, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """[B, T, H, D] ``o`` in the layout ``roles`` of a value of ``shape``."""
    present = sorted((a, r) for r, a in roles.items() if a is not None)
    order = "BTHD"
    kept = [r for r in order if roles.get(r) is not None]
    o = o.reshape(tuple(o.shape[order.index(r)] for r in kept))
    perm = [kept.index(r) for _, r in present]
    if perm != list(range(len(perm))):
        o = jnp.transpose(o, perm)
    o = o.reshape(shape) if o.shape != shape else o
    return o.astype(dtype) if o.dtype != dtype else o


def _snippet(m: _Match) -> Callable[..., jax.Array]:
    def attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        q_bthd = _to_bthd(q, m.q.roles, "BTHD")
        k_bshd = _to_bthd(k, m.k.roles, "BSHD")
        v_bshd = _to_bthd(v, m.v.roles, "BSHD")
        B, T, _, _ = q_bthd.shape
        S = k_bshd.shape[1]
        pos_bt = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32) + m.offset, (B, T))
        lens_b = jnp.full((B,), S, jnp.int32)
        o = ops.ligerjax_attention(
            q_bthd, k_bshd, v_bshd, pos_bt, lens_b, causal=m.causal, sm_scale=m.sm_scale
        )
        return _from_bthd(o, m.out.roles, m.out.shape, m.out.var.aval.dtype)

    return attend


def _inline(fn: Callable[..., Any], ins: Sequence[Any], outs: Sequence[Any]) -> list[ir.JaxprEqn]:
    """The equations of ``fn`` traced at ``ins``' avals, reading ``ins``, defining ``outs``."""
    closed = ir.make_jaxpr(fn, *[ir.aval_of(a) for a in ins])
    j = closed.jaxpr
    if closed.consts or len(j.outvars) != len(outs):
        raise _NoMatch("constants_in_replacement")
    env: dict[Any, Any] = dict(zip(j.invars, ins, strict=True))
    rename = {o: n for o, n in zip(j.outvars, outs, strict=True) if not ir.is_literal(o)}
    if len(rename) != len(outs) or any(o in env for o in rename):
        raise _NoMatch("constants_in_replacement")
    eqns = []
    for e in j.eqns:
        new_ins = [a if ir.is_literal(a) else env.get(a, a) for a in e.invars]
        eqns.append(e.replace(invars=new_ins, outvars=[rename.get(v, v) for v in e.outvars]))
    return eqns


# ---------------------------------------------------------------------------------------------
# the rule table


Rule = Callable[[ir.JaxprEqn, _Run], list[ir.JaxprEqn]]


def copy_eqn(eqn: ir.JaxprEqn, run: _Run) -> list[ir.JaxprEqn]:
    """The default rule: the equation unchanged."""
    return [eqn]


def route_attention(eqn: ir.JaxprEqn, run: _Run) -> list[ir.JaxprEqn]:
    """A ``ligerjax_attention`` call re-emitted through the kernels' dispatching op."""
    params = ops.attention_params(eqn)
    if params is None or len(eqn.invars) != 5:
        run.fallbacks["ligerjax_attention_unreadable"] += 1
        return [eqn]

    def attend(q, k, v, pos, lens):
        return ops.ligerjax_attention(
            q, k, v, pos, lens, causal=params.causal, sm_scale=params.sm_scale
        )

    run.rewrites["ligerjax_attention_routed"] += 1
    return _inline(attend, eqn.invars, eqn.outvars)


def recurse(eqn: ir.JaxprEqn, run: _Run) -> list[ir.JaxprEqn]:
    """A higher-order equation with every sub-jaxpr rewritten (the equation kept otherwise)."""
    params, changed = dict(eqn.params), False
    for key, val in eqn.params.items():
        if isinstance(val, ir.ClosedJaxpr):
            new = _rewrite_closed(val, run)
        elif isinstance(val, ir.Jaxpr):
            new = _rewrite_closed(ir.ClosedJaxpr(val, ()), run).jaxpr
            new = val if new is val else new
        elif isinstance(val, tuple) and val and all(isinstance(b, ir.ClosedJaxpr) for b in val):
            new = tuple(_rewrite_closed(b, run) for b in val)
            new = val if all(a is b for a, b in zip(new, val, strict=True)) else new
        else:
            continue
        if new is not val:
            params[key], changed = new, True
    return [eqn.replace(params=params)] if changed else [eqn]


def rewrite_call(eqn: ir.JaxprEqn, run: _Run) -> list[ir.JaxprEqn]:
    """jit: route a ``ligerjax_attention`` call, recurse into any other."""
    return route_attention(eqn, run) if ops.is_attention(eqn) else recurse(eqn, run)


RULES: dict[str, Rule] = {
    "pjit": rewrite_call,
    "jit": rewrite_call,
    **dict.fromkeys(("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"), recurse),
    **dict.fromkeys(("scan", "while", "cond", "remat", "checkpoint", "shard_map"), recurse),
}


def rule_for(eqn: ir.JaxprEqn) -> Rule:
    """The rule of an equation's primitive; the default copies it."""
    return RULES.get(eqn.primitive.name, copy_eqn)


# ---------------------------------------------------------------------------------------------
# one jaxpr level


def _live(eqns: Sequence[ir.JaxprEqn], outvars: Sequence[Any], keep: set[int]) -> list[bool]:
    """Which equations some output needs (effects and ``keep`` ids always count)."""
    live = {v for v in outvars if not ir.is_literal(v)}
    alive = [False] * len(eqns)
    for i in range(len(eqns) - 1, -1, -1):
        e = eqns[i]
        if e.effects or id(e) in keep or any(v in live for v in e.outvars):
            alive[i] = True
            live.update(a for a in e.invars if not ir.is_literal(a))
    return alive


def _softmax_qkv(closed: ir.ClosedJaxpr, run: _Run) -> dict[int, list[ir.JaxprEqn]]:
    """Matched subgraphs of this level: top equation -> replacement ([] deletes it)."""
    flat = _flatten(closed)
    taken: set[int] = set()
    finals: set[Any] = set()
    plan: dict[int, list[ir.JaxprEqn]] = {}
    for i, eqn in enumerate(flat.eqns):
        if eqn.primitive.name != "dot_general" or flat.inlined[i] or flat.top[i] in taken:
            continue
        try:
            m = _match(flat, i)
            if m is None:
                continue
            tops = _check_rewritable(flat, m, taken, finals)
            new = _inline(_snippet(m), [m.q.var, m.k.var, m.v.var], [m.out.var])
        except _NoMatch as e:
            if e.args[0] != "not_at_this_level":
                run.fallbacks[f"softmax_qkv_{e.args[0]}"] += 1
            continue
        taken |= tops
        finals.add(m.out.var)
        at = flat.top[flat.producer[m.out.var]]
        plan.update({t: [] for t in tops})
        plan[at] = new
        run.rewrites["softmax_qkv_matched"] += 1
    return plan


def _rewrite_closed(closed: ir.ClosedJaxpr, run: _Run) -> ir.ClosedJaxpr:
    """``closed`` with this level's subgraphs replaced and every equation through its rule."""
    key = id(closed)
    if key in run.memo:  # a body shared by several calls: rewrite once, count every time
        new, rewrites, fallbacks = run.memo[key]
        run.rewrites.update(rewrites)
        run.fallbacks.update(fallbacks)
        return new
    before = (collections.Counter(run.rewrites), collections.Counter(run.fallbacks))
    jaxpr = closed.jaxpr
    plan = _softmax_qkv(closed, run)
    eqns: list[ir.JaxprEqn] = []
    for i, eqn in enumerate(jaxpr.eqns):
        eqns += plan[i] if i in plan else rule_for(eqn)(eqn, run)
    if plan:  # drop what only the replaced subgraphs used (not what was dead before)
        dead_before = _live(jaxpr.eqns, jaxpr.outvars, set())
        keep = {id(e) for e, alive in zip(jaxpr.eqns, dead_before, strict=True) if not alive}
        eqns = [e for e, alive in zip(eqns, _live(eqns, jaxpr.outvars, keep), strict=True) if alive]
    changed = len(eqns) != len(jaxpr.eqns) or any(
        a is not b for a, b in zip(eqns, jaxpr.eqns, strict=False)
    )
    new = ir.rebuild(closed, eqns) if changed else closed
    run.memo[key] = (new, run.rewrites - before[0], run.fallbacks - before[1])
    return new


# ---------------------------------------------------------------------------------------------
# the pass


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionProgram(Traced):
    """A :class:`Traced` whose jaxpr has had the attention pass; calling it runs that jaxpr.

    ``traced`` is the input; every later pass takes this object as it takes a ``Traced``.
    """

    traced: Traced
    report: PassReport

    def flat_call(self, *flat: Any) -> list[Any]:
        """Evaluate the rewritten jaxpr on flat weights then flat arguments."""
        return ir.eval_jaxpr(self.jaxpr, *flat)

    def at_args(self, example_args: tuple[Any, ...]) -> AttentionProgram:
        """The source step re-traced at ``example_args``' shapes, with the pass applied again."""
        return _rewrite(self.traced.at_args(example_args))

    @functools.cached_property
    def _jitted(self) -> Callable[..., Any]:
        return jax.jit(ir.jaxpr_fun(self.jaxpr))

    def __call__(self, weights: Sequence[jax.Array], *args: Any) -> Any:
        """Run the rewritten program; same inputs and outputs as the original model."""
        outs = self._jitted(*weights, *self.flat_args(args))
        return jax.tree_util.tree_unflatten(self.out_treedef, list(outs))


def attention(traced: Traced, ctx: PassContext) -> AttentionProgram:
    """Route ``ligerjax_attention`` calls and replace softmax(QKᵀ)V subgraphs by them.

    ``ctx`` is not read (the kernel is chosen when the program is lowered); it is taken for
    the uniform pass signature.
    """
    del ctx
    return _rewrite(traced)


def _rewrite(traced: Traced) -> AttentionProgram:
    run = _Run()
    new = _rewrite_closed(traced.jaxpr, run)
    report = PassReport(
        name="attention", rewrites=dict(run.rewrites), fallbacks=dict(run.fallbacks)
    )
    fields = {f.name: getattr(traced, f.name) for f in dataclasses.fields(Traced)}
    return AttentionProgram(**{**fields, "jaxpr": new}, traced=traced, report=report)


def attention_pass(program: Traced, ctx: PassContext) -> tuple[AttentionProgram, PassReport]:
    """The pass-manager entry point of :func:`attention`."""
    out = attention(program, ctx)
    return out, out.report


attention_pass.pass_name = "attention"  # type: ignore[attr-defined]
