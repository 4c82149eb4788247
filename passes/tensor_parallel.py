"""Tensor parallelism (intra-operator split): the global jaxpr → a per-device jaxpr.

The pass interprets the global jaxpr once, equation by equation, with a sharding
environment that maps every value to the dimension split over ``ctx.tp_axis`` (or None:
replicated) and to the parameter the split came from. A rule per primitive emits the local
computation (re-traced into a new jaxpr; the input is never mutated): column-parallel
matmuls keep the split, a contracting split becomes a local matmul and a ``psum``,
reshapes follow a split through ``[.., H*D] <-> [.., H, D]``, and the
``ligerjax_attention`` call runs on the local heads. The default rule all-gathers split
operands and computes replicated: correct, slow, and counted in the report.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from ligerjax import ops
from ligerjax.compiler import ir
from ligerjax.compiler.pass_manager import PassContext, PassReport
from ligerjax.compiler.trace import Traced
from passes.partition_rules import resolve_split


class Sharded(NamedTuple):
    """A local value, the global dimension split over the axis (None: replicated), origin."""

    val: Any
    dim: int | None
    origin: str | None = None


@dataclasses.dataclass
class _Run:
    """Mutable bookkeeping of one pass run (never shared between runs)."""

    axis: str
    n: int
    strict: bool = False
    rewrites: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    fallbacks: collections.Counter = dataclasses.field(default_factory=collections.Counter)


Rule = Callable[[ir.JaxprEqn, list[Sharded], _Run], list[Sharded]]


# ---------------------------------------------------------------------------------------------
# helpers


def _local_slice(x: Any, dim: int, run: _Run) -> Any:
    """This device's block of a replicated value along ``dim`` (no communication)."""
    size = x.shape[dim] // run.n
    start = jax.lax.axis_index(run.axis) * size
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=dim)


def _gather(s: Sharded, run: _Run) -> Any:
    if s.dim is None:
        return s.val
    return jax.lax.all_gather(s.val, run.axis, axis=s.dim, tiled=True)


def _replicated(eqn: ir.JaxprEqn, vals: Sequence[Any]) -> list[Sharded]:
    return [Sharded(v, None) for v in ir.eval_eqn(eqn, vals)]


def _origin(ins: Sequence[Sharded]) -> str | None:
    return next((s.origin for s in ins if s.origin), None)


def default_rule(eqn: ir.JaxprEqn, ins: list[Sharded], run: _Run) -> list[Sharded]:
    """All-gather split operands, compute replicated (counted as a fallback); in strict
    mode, a ValueError naming the primitive and the split operand's origin and dim."""
    if any(s.dim is not None for s in ins):
        if run.strict:
            i, s = next((i, s) for i, s in enumerate(ins) if s.dim is not None)
            raise ValueError(
                f"tensor_parallel: primitive {eqn.primitive.name!r} has no split rule, and its "
                f"operand {i} ({s.origin or 'a value'}) is split on dim {s.dim} over mesh axis "
                f"{run.axis!r}; replicate that parameter with a partition rule, or leave "
                "strict off to all-gather it"
            )
        run.fallbacks[eqn.primitive.name] += 1
    return _replicated(eqn, [_gather(s, run) for s in ins])


# ---------------------------------------------------------------------------------------------
# first-order rules


def split_elementwise(eqn: ir.JaxprEqn, ins: list[Sharded], run: _Run) -> list[Sharded]:
    dims = {s.dim for s in ins if s.dim is not None}
    if not dims:
        return _replicated(eqn, [s.val for s in ins])
    if len(dims) > 1:
        return default_rule(eqn, ins, run)
    (d,) = dims
    vals = []
    for s in ins:
        if s.dim is None and jnp.ndim(s.val) > d and s.val.shape[d] > 1:
            vals.append(_local_slice(s.val, d, run))
        else:
            vals.append(s.val)
    outs = ir.bind(eqn.primitive, *vals, **eqn.params)
    return [Sharded(o, d, _origin(ins)) for o in outs]


def split_dot_general(eqn: ir.JaxprEqn, ins: list[Sharded], run: _Run) -> list[Sharded]:
    (lhs, rhs), params = ins, eqn.params
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    lc, rc, lb, rb = tuple(lc), tuple(rc), tuple(lb), tuple(rb)
    sl, sr = lhs.dim, rhs.dim
    if sl is None and sr is None:
        return _replicated(eqn, [lhs.val, rhs.val])
    lfree = [d for d in range(jnp.ndim(lhs.val)) if d not in lc and d not in lb]
    rfree = [d for d in range(jnp.ndim(rhs.val)) if d not in rc and d not in rb]
    origin = _origin(ins)

    def dot(a: Any, b: Any) -> Any:
        return ir.bind(eqn.primitive, a, b, **params)[0]

    # A contracting dimension split: local matmul, then all-reduce.
    if sl in lc or sr in rc:
        li, ri = (lc.index(sl), None) if sl in lc else (None, rc.index(sr))
        i = li if li is not None else ri
        if (sl is not None and sl != lc[i]) or (sr is not None and sr != rc[i]):
            return default_rule(eqn, ins, run)
        a = lhs.val if sl is not None else _local_slice(lhs.val, lc[i], run)
        b = rhs.val if sr is not None else _local_slice(rhs.val, rc[i], run)
        run.rewrites["psum"] += 1
        return [Sharded(jax.lax.psum(dot(a, b), run.axis), None)]
    # A batch dimension split on one or both sides.
    if sl in lb or sr in rb:
        i = lb.index(sl) if sl in lb else rb.index(sr)
        if (sl is not None and sl != lb[i]) or (sr is not None and sr != rb[i]):
            return default_rule(eqn, ins, run)
        a = lhs.val if sl is not None else _local_slice(lhs.val, lb[i], run)
        b = rhs.val if sr is not None else _local_slice(rhs.val, rb[i], run)
        return [Sharded(dot(a, b), i, origin)]
    # A free dimension split on exactly one side (column parallel).
    if sr is None:
        return [Sharded(dot(lhs.val, rhs.val), len(lb) + lfree.index(sl), origin)]
    if sl is None:
        return [Sharded(dot(lhs.val, rhs.val), len(lb) + len(lfree) + rfree.index(sr), origin)]
    return default_rule(eqn, ins, run)


def split_reshape(eqn: ir.JaxprEqn, ins: list[Sharded], run: _Run) -> list[Sharded]:
    (x,) = ins[:1]
    if x.dim is None:
        return _replicated(eqn, [s.val for s in ins])
    if eqn.params.get("dimensions") is not None or len(ins) != 1:
        return default_rule(eqn, ins, run)
    in_shape = tuple(eqn.invars[0].aval.shape)
    out_shape = tuple(eqn.params["new_sizes"])
    d = x.dim
    prefix = math.prod(in_shape[:d])
    for e in range(len(out_shape)):
        if math.prod(out_shape[:e]) == prefix and out_shape[e] > 1:
            break
    else:
        return default_rule(eqn, ins, run)
    if math.prod(out_shape[:e]) != prefix or (
        in_shape[d] % out_shape[e] and out_shape[e] % in_shape[d]
    ):
        return default_rule(eqn, ins, run)
    if out_shape[e] % run.n:
        raise ValueError(
            f"tensor_parallel: {x.origin or 'a value'} is split over mesh axis {run.axis!r} "
            f"of size {run.n}, but a reshape {in_shape} -> {out_shape} puts the split on dim "
            f"{e} of size {out_shape[e]}, which does not divide by {run.n}"
        )
    local = list(out_shape)
    local[e] //= run.n
    run.rewrites["reshape"] += 1
    return [Sharded(jax.lax.reshape(x.val, tuple(local)), e, x.origin)]


def split_transpose(eqn: ir.JaxprEqn, ins: list[Sharded], run: _Run) -> list[Sharded]:
    (x,) = ins
    if x.dim is None:
        return _replicated(eqn, [x.val])
    perm = tuple(eqn.params["permutation"])
    out = ir.bind(eqn.primitive, x.val, **eqn.params)[0]
    return [Sharded(out, perm.index(x.dim), x.origin)]


def split_broadcast_in_dim(eqn: ir.JaxprEqn, ins: list[Sharded], run: _Run) -> list[Sharded]:
    x = ins[0]
    if x.dim is None:
        return _replicated(eqn, [s.val for s in ins])
    if len(ins) != 1:
        return default_rule(eqn, ins, run)
    bdims = tuple(eqn.params["broadcast_dimensions"])
    e = bdims[x.dim]
    shape = list(eqn.params["shape"])
    shape[e] = x.val.shape[x.dim]
    return [Sharded(jax.lax.broadcast_in_dim(x.val, tuple(shape), bdims), e, x.origin)]


_CROSS_REDUCE = {"reduce_sum": jax.lax.psum, "reduce_max": jax.lax.pmax, "reduce_min": jax.lax.pmin}


def split_reduce(eqn: ir.JaxprEqn, ins: list[Sharded], run: _Run) -> list[Sharded]:
    (x,) = ins
    if x.dim is None:
        return _replicated(eqn, [x.val])
    axes = tuple(eqn.params["axes"])
    out = ir.bind(eqn.primitive, x.val, **eqn.params)[0]
    if x.dim in axes:
        cross = _CROSS_REDUCE.get(eqn.primitive.name)
        if cross is None:
            return default_rule(eqn, ins, run)
        run.rewrites[cross.__name__] += 1
        return [Sharded(cross(out, run.axis), None)]
    return [Sharded(out, x.dim - sum(a < x.dim for a in axes), x.origin)]


def _keeps_dim(key: str) -> Rule:
    """Rule for ops whose ``params[key]`` names one axis; the split must be another."""

    def rule(eqn: ir.JaxprEqn, ins: list[Sharded], run: _Run) -> list[Sharded]:
        if all(s.dim is None for s in ins):
            return _replicated(eqn, [s.val for s in ins])
        if eqn.params[key] == next(s.dim for s in ins if s.dim is not None):
            return default_rule(eqn, ins, run)
        return split_elementwise(eqn, ins, run)

    return rule


def split_squeeze(eqn: ir.JaxprEqn, ins: list[Sharded], run: _Run) -> list[Sharded]:
    (x,) = ins
    if x.dim is None:
        return _replicated(eqn, [x.val])
    dims = tuple(eqn.params["dimensions"])
    out = ir.bind(eqn.primitive, x.val, **eqn.params)[0]
    return [Sharded(out, x.dim - sum(a < x.dim for a in dims), x.origin)]


def split_slice(eqn: ir.JaxprEqn, ins: list[Sharded], run: _Run) -> list[Sharded]:
    (x,) = ins
    if x.dim is None:
        return _replicated(eqn, [x.val])
    d, full = x.dim, eqn.invars[0].aval.shape[x.dim]
    start, limit = list(eqn.params["start_indices"]), list(eqn.params["limit_indices"])
    strides = eqn.params["strides"]
    if start[d] != 0 or limit[d] != full or (strides is not None and strides[d] != 1):
        return default_rule(eqn, ins, run)
    limit[d] = x.val.shape[d]
    return [Sharded(jax.lax.slice(x.val, start, limit, strides), d, x.origin)]


def split_pad(eqn: ir.JaxprEqn, ins: list[Sharded], run: _Run) -> list[Sharded]:
    x, pad = ins
    if x.dim is None:
        return _replicated(eqn, [x.val, pad.val])
    if tuple(eqn.params["padding_config"][x.dim]) != (0, 0, 0) or pad.dim is not None:
        return default_rule(eqn, ins, run)
    out = ir.bind(eqn.primitive, x.val, pad.val, **eqn.params)[0]
    return [Sharded(out, x.dim, x.origin)]


def split_dynamic_slice(eqn: ir.JaxprEqn, ins: list[Sharded], run: _Run) -> list[Sharded]:
    x, idx = ins[0], ins[1:]
    if all(s.dim is None for s in ins):
        return _replicated(eqn, [s.val for s in ins])
    sizes = list(eqn.params["slice_sizes"])
    if x.dim is None or any(s.dim is not None for s in idx):
        return default_rule(eqn, ins, run)
    if sizes[x.dim] != eqn.invars[0].aval.shape[x.dim]:
        return default_rule(eqn, ins, run)
    sizes[x.dim] = x.val.shape[x.dim]
    starts = [s.val for s in idx]
    return [Sharded(jax.lax.dynamic_slice(x.val, starts, sizes), x.dim, x.origin)]


def split_dynamic_update_slice(eqn: ir.JaxprEqn, ins: list[Sharded], run: _Run) -> list[Sharded]:
    x, upd, idx = ins[0], ins[1], ins[2:]
    if all(s.dim is None for s in ins):
        return _replicated(eqn, [s.val for s in ins])
    d = x.dim if x.dim is not None else upd.dim
    full = eqn.invars[0].aval.shape[d]
    if (
        any(s.dim is not None for s in idx)
        or upd.dim not in (None, d)
        or eqn.invars[1].aval.shape[d] != full
    ):
        return default_rule(eqn, ins, run)
    xv = x.val if x.dim is not None else _local_slice(x.val, d, run)
    uv = upd.val if upd.dim is not None else _local_slice(upd.val, d, run)
    out = jax.lax.dynamic_update_slice(xv, uv, [s.val for s in idx])
    return [Sharded(out, d, _origin(ins))]


# ---------------------------------------------------------------------------------------------
# higher-order rules


def _interpret(closed: ir.ClosedJaxpr, ins: Sequence[Sharded], run: _Run) -> list[Sharded]:
    """Evaluate ``closed`` on local values, every equation through its rule."""
    env: dict[Any, Sharded] = {}
    jaxpr = closed.jaxpr
    for v, c in zip(jaxpr.constvars, closed.consts, strict=True):
        env[v] = Sharded(c, None)
    for v, s in zip(jaxpr.invars, ins, strict=True):
        env[v] = s

    def read(a: Any) -> Sharded:
        return Sharded(a.val, None) if ir.is_literal(a) else env[a]

    for eqn in jaxpr.eqns:
        outs = rule_for(eqn)(eqn, [read(a) for a in eqn.invars], run)
        for v, s in zip(eqn.outvars, outs, strict=True):
            env[v] = s
    return [read(a) for a in jaxpr.outvars]


def split_call(eqn: ir.JaxprEqn, ins: list[Sharded], run: _Run) -> list[Sharded]:
    """jit / custom_jvp_call / custom_vjp_call: recurse into the body (inlined)."""
    if all(s.dim is None for s in ins):
        return _replicated(eqn, [s.val for s in ins])
    body = ir.call_jaxpr(eqn)
    if body is None or len(body.jaxpr.invars) != len(ins):
        return default_rule(eqn, ins, run)
    return _interpret(body, ins, run)


def _local_kv_heads(eqn: ir.JaxprEqn, k: Any, v: Any, run: _Run) -> tuple[Any, Any] | None:
    """The KV heads that this device's query heads attend with (GQA groups stay whole)."""
    H, K = eqn.invars[0].aval.shape[2], eqn.invars[1].aval.shape[2]
    h_local, group = H // run.n, H // K
    if K % run.n == 0:
        count = K // run.n
        start = jax.lax.axis_index(run.axis) * count
    elif group % h_local == 0:  # every local query head is in one group
        count = 1
        start = jax.lax.axis_index(run.axis) * h_local // group
    else:
        return None
    return (
        jax.lax.dynamic_slice_in_dim(k, start, count, axis=2),
        jax.lax.dynamic_slice_in_dim(v, start, count, axis=2),
    )


def split_attention(eqn: ir.JaxprEqn, ins: list[Sharded], run: _Run) -> list[Sharded]:
    """``ligerjax_attention`` with q/k/v split by heads: attention on the local heads."""
    if all(s.dim is None for s in ins):
        return _replicated(eqn, [s.val for s in ins])
    q, k, v, qpos, lens = ins
    probed = ops.attention_params(eqn)
    if probed is None or (q.dim, qpos.dim, lens.dim) != (2, None, None):
        return default_rule(eqn, ins, run)
    if (k.dim, v.dim) == (None, None):  # K/V replicated (few KV heads): take this shard's
        kv = _local_kv_heads(eqn, k.val, v.val, run)
        if kv is None:
            return default_rule(eqn, ins, run)
        k, v = Sharded(kv[0], 2), Sharded(kv[1], 2)
    elif (k.dim, v.dim) != (2, 2):
        return default_rule(eqn, ins, run)
    causal, scale = probed
    run.rewrites["attention_local_heads"] += 1
    out = ops.ligerjax_attention(
        q.val, k.val, v.val, qpos.val, lens.val, causal=causal, sm_scale=scale
    )
    return [Sharded(out, 2, q.origin)]


def split_jit(eqn: ir.JaxprEqn, ins: list[Sharded], run: _Run) -> list[Sharded]:
    if ops.is_attention(eqn):
        return split_attention(eqn, ins, run)
    return split_call(eqn, ins, run)


# ---------------------------------------------------------------------------------------------
# the rule table

_ELEMENTWISE = (
    "add",
    "sub",
    "mul",
    "div",
    "rem",
    "pow",
    "max",
    "min",
    "neg",
    "sign",
    "floor",
    "ceil",
    "round",
    "abs",
    "exp",
    "exp2",
    "log",
    "log1p",
    "expm1",
    "tanh",
    "logistic",
    "sin",
    "cos",
    "tan",
    "sqrt",
    "rsqrt",
    "cbrt",
    "erf",
    "erfc",
    "erf_inv",
    "atan2",
    "integer_pow",
    "square",
    "convert_element_type",
    "select_n",
    "clamp",
    "and",
    "or",
    "xor",
    "not",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "is_finite",
    "nextafter",
    "copy",
    "copy_p",
    "reduce_precision",
    "real",
    "imag",
    "conj",
    "stop_gradient",
)

SPLIT_RULES: dict[str, Rule] = {
    **{name: split_elementwise for name in _ELEMENTWISE},
    "dot_general": split_dot_general,
    "reshape": split_reshape,
    "transpose": split_transpose,
    "broadcast_in_dim": split_broadcast_in_dim,
    "squeeze": split_squeeze,
    **{name: split_reduce for name in ("reduce_sum", "reduce_max", "reduce_min")},
    **{name: split_reduce for name in ("reduce_prod", "reduce_and", "reduce_or")},
    "split": _keeps_dim("axis"),
    "concatenate": _keeps_dim("dimension"),
    **{name: _keeps_dim("axis") for name in ("cumsum", "cumprod", "cummax", "cummin")},
    "slice": split_slice,
    "pad": split_pad,
    "dynamic_slice": split_dynamic_slice,
    "dynamic_update_slice": split_dynamic_update_slice,
    "pjit": split_jit,
    "jit": split_jit,
    "custom_jvp_call": split_call,
    "custom_vjp_call": split_call,
    "custom_vjp_call_jaxpr": split_call,
}


def rule_for(eqn: ir.JaxprEqn) -> Rule:
    """The split rule of an equation's primitive; the all-gather default when there is none."""
    return SPLIT_RULES.get(eqn.primitive.name, default_rule)


# ---------------------------------------------------------------------------------------------
# the pass


def _spec(ndim: int, dim: int | None, axis: str) -> PartitionSpec:
    return PartitionSpec(*[axis if i == dim else None for i in range(ndim)])


@dataclasses.dataclass(frozen=True)
class TPProgram:
    """The per-device program of a tensor-parallel model and how to run it on the mesh."""

    traced: Traced
    mesh: jax.sharding.Mesh
    tp_axis: str
    jaxpr: ir.ClosedJaxpr  # per device: invars are the local [weights..., args...]
    weight_specs: tuple[PartitionSpec, ...]
    arg_specs: tuple[PartitionSpec, ...]
    out_specs: tuple[PartitionSpec, ...]
    report: PassReport
    _fn: Callable[..., Any] = dataclasses.field(repr=False, compare=False)

    def shard_weights(self, weights: Sequence[jax.Array]) -> list[jax.Array]:
        """Put each weight on the mesh, split by its partition rule."""
        return [
            jax.device_put(w, NamedSharding(self.mesh, s))
            for w, s in zip(weights, self.weight_specs, strict=True)
        ]

    def __call__(self, weights: Sequence[jax.Array], *args: Any) -> Any:
        """Run the tensor-parallel model; same inputs and outputs as the original."""
        flat, treedef = jax.tree_util.tree_flatten(args)
        if treedef != self.traced.args_treedef:
            raise ValueError(
                f"arguments {treedef} do not match the traced {self.traced.args_treedef}"
            )
        outs = self._fn(*self.shard_weights(weights), *flat)
        return jax.tree_util.tree_unflatten(self.traced.out_treedef, outs)


def tensor_parallel(traced: Traced, ctx: PassContext) -> TPProgram:
    """Split ``traced`` Megatron-style over ``ctx.tp_axis`` of ``ctx.mesh``.

    Weights are split by ``ctx.partition_rules`` then the default rules; arguments are
    replicated. Raises ValueError naming the parameter, dimension and axis size when a split
    does not divide.
    """
    if ctx.mesh is None or ctx.tp_axis not in ctx.mesh.shape:
        raise ValueError(f"tensor_parallel needs a mesh with axis {ctx.tp_axis!r}, got {ctx.mesh}")
    n = ctx.mesh.shape[ctx.tp_axis]
    axis = ctx.tp_axis
    in_avals = [v.aval for v in traced.jaxpr.jaxpr.invars]
    in_dims: list[int | None] = []
    origins: list[str | None] = []
    for path, w in zip(traced.weight_paths, traced.weights, strict=True):
        d = resolve_split(path, w.ndim, ctx.partition_rules)
        if d is not None and w.shape[d] % n:
            raise ValueError(
                f"tensor_parallel: parameter {path!r} dim {d} (size {w.shape[d]}) does not "
                f"divide by mesh axis {axis!r} of size {n}"
            )
        in_dims.append(d)
        origins.append(f"parameter {path!r} (dim {d})" if d is not None else None)
    in_dims += [None] * (len(in_avals) - len(in_dims))
    origins += [None] * (len(in_avals) - len(origins))
    local_avals = []
    for a, d in zip(in_avals, in_dims, strict=True):
        shape = list(a.shape)
        if d is not None:
            shape[d] //= n
        local_avals.append(jax.ShapeDtypeStruct(tuple(shape), a.dtype))

    run = _Run(axis=axis, n=n, strict=ctx.strict)
    out_dims: list[int | None] = []

    def local_fn(*vals: Any) -> list[Any]:
        ins = [Sharded(v, d, o) for v, d, o in zip(vals, in_dims, origins, strict=True)]
        outs = _interpret(traced.jaxpr, ins, run)
        out_dims[:] = [s.dim for s in outs]
        return [s.val for s in outs]

    per_device = ir.make_jaxpr(local_fn, *local_avals, axis_env=[(axis, n)])
    in_specs = tuple(_spec(len(a.shape), d, axis) for a, d in zip(in_avals, in_dims, strict=True))
    out_specs = tuple(
        _spec(len(v.aval.shape), d, axis)
        for v, d in zip(traced.jaxpr.jaxpr.outvars, out_dims, strict=True)
    )
    body = ir.jaxpr_fun(per_device)
    fn = jax.jit(
        jax.shard_map(
            lambda *a: tuple(body(*a)),
            mesh=ctx.mesh,
            in_specs=in_specs,
            out_specs=out_specs,
            check_vma=False,
        )
    )
    report = PassReport(
        name="tensor_parallel", rewrites=dict(run.rewrites), fallbacks=dict(run.fallbacks)
    )
    nw = traced.num_weights
    return TPProgram(
        traced=traced,
        mesh=ctx.mesh,
        tp_axis=axis,
        jaxpr=per_device,
        weight_specs=in_specs[:nw],
        arg_specs=in_specs[nw:],
        out_specs=out_specs,
        report=report,
        _fn=fn,
    )


def tensor_parallel_pass(program: Traced, ctx: PassContext) -> tuple[TPProgram, PassReport]:
    """The pass-manager entry point of :func:`tensor_parallel`."""
    tp = tensor_parallel(program, ctx)
    return tp, tp.report


tensor_parallel_pass.pass_name = "tensor_parallel"  # type: ignore[attr-defined]
