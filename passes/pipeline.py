"""Pipeline parallelism (inter-operator split): cut the layer sequence into stages on ``pp``.

The pass reads the (per-device) jaxpr of a traced model or of a tensor-parallel program
and finds its *cut points*: positions in the equation list where the values carried
from the equations before to the equations after are few and have the same shapes at
every candidate (for a transformer: the residual stream between layers), and where no
module's weights are used on both sides (a cut never splits ``layers.3``). Values that
depend only on the arguments and constants (positions, RoPE tables, masks) are not
carried: every stage recomputes what it needs. The units between cut points are priced
with the cost model and cut into ``pp`` stages by :func:`stage_cuts` (exact dynamic
programming minimising the slowest stage, as AlpaServe does for inference).

The stages run in one jitted ``shard_map`` over the mesh. Each device holds only its own
stage's weights: per dtype, every stage's (tensor-parallel local) weights are flattened
into one buffer, padded to the largest stage and stacked ``[pp, (tp,) L]`` sharded over
``pp`` (and ``tp``); a stage slices its weights back out of its shard. The schedule is
GPipe's forward pass, unrolled: ``m + pp - 1`` ticks; at tick ``t`` the device of stage
``s`` runs micro-batch ``t - s`` (``lax.switch`` on ``axis_index(pp)``; an idle branch
in the pipeline bubble), then
``ppermute`` moves every carried value from stage ``s`` to ``s + 1`` (no move after the
last tick). The outputs are stacked over ``pp`` and the host keeps the last stage's.

Micro-batches need the model's jaxpr at the micro-batch shape; a jaxpr's shapes are
fixed, so for ``num_microbatches > 1`` the pass asks its input for the step at the
micro-batch shape (:meth:`~ligerjax.compiler.Traced.at_args`: the source re-traced, with
the attention pass re-applied when it ran) and, for a tensor-parallel program, re-runs
:func:`passes.tensor_parallel.tensor_parallel` on it, checking that the weights are split
the same way.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ligerjax.compiler import ir
from ligerjax.compiler.pass_manager import PassContext, PassReport
from ligerjax.compiler.trace import Traced
from passes.assemble import dot_flops, nbytes
from passes.tensor_parallel import TPProgram, tensor_parallel

# ---------------------------------------------------------------------------------------------
# balancing


def stage_cuts(costs: Sequence[float], num_stages: int) -> tuple[int, ...]:
    """Split ``costs`` into ``num_stages`` contiguous non-empty stages, slowest stage minimal.

    Returns the boundaries ``(0, c_1, ..., len(costs))``: stage ``s`` is
    ``costs[b[s]:b[s + 1]]``. Exact dynamic programming; among optimal splits the one with
    the earliest cuts (each cut as early as the rest allows).
    """
    costs = [float(c) for c in costs]
    n = len(costs)
    if not 1 <= num_stages <= n:
        raise ValueError(
            f"stage_cuts: num_stages={num_stages} must be between 1 and len(costs)={n}"
        )
    for i, c in enumerate(costs):
        if not c >= 0:
            raise ValueError(f"stage_cuts: costs[{i}]={c} must be >= 0")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def seg(a: int, b: int) -> float:
        return prefix[b] - prefix[a]

    # best[s][i]: the smallest slowest stage of costs[i:] split into s stages.
    best = [[math.inf] * (n + 1) for _ in range(num_stages + 1)]
    best[0][n] = 0.0
    for s in range(1, num_stages + 1):
        for i in range(n - s, -1, -1):
            best[s][i] = min(max(seg(i, b), best[s - 1][b]) for b in range(i + 1, n - (s - 1) + 1))
    opt = best[num_stages][0]
    bounds, i = [0], 0
    for s in range(num_stages, 1, -1):
        i = next(
            b for b in range(i + 1, n - (s - 1) + 1) if seg(i, b) <= opt and best[s - 1][b] <= opt
        )
        bounds.append(i)
    bounds.append(n)
    return tuple(bounds)


# ---------------------------------------------------------------------------------------------
# pricing


def _flops_bytes(eqn: ir.JaxprEqn) -> tuple[float, float]:
    """FLOPs and memory traffic of one first-order equation (roofline inputs)."""
    ins = [ir.aval_of(a) for a in eqn.invars]
    outs = [v.aval for v in eqn.outvars]
    moved = float(sum(nbytes(a) for a in ins + outs))
    if eqn.primitive.name == "dot_general":
        return dot_flops(eqn), moved
    return float(sum(math.prod(a.shape) for a in outs)), moved


def _float_dtype(eqn: ir.JaxprEqn) -> Any:
    for a in [*(ir.aval_of(x) for x in eqn.invars), *(v.aval for v in eqn.outvars)]:
        if jnp.issubdtype(a.dtype, jnp.floating):
            return a.dtype
    return "float32"


def _axis_size(mesh: jax.sharding.Mesh, axes: Any) -> int:
    axes = axes if isinstance(axes, tuple) else (axes,)
    return math.prod(mesh.shape[a] for a in axes if a in mesh.shape)


def eqn_cost(eqn: ir.JaxprEqn, cost: Any, mesh: jax.sharding.Mesh) -> float:
    """Predicted seconds of one equation: roofline per kernel, ring all-reduce for psum,
    the sum over the body for call-like equations (jit, custom_jvp, ...)."""
    body = ir.call_jaxpr(eqn)
    subs = [body] if body is not None else ir.sub_jaxprs(eqn)
    if subs:
        return sum(eqn_cost(e, cost, mesh) for sub in subs for e in sub.jaxpr.eqns)
    if eqn.primitive.name == "psum":
        n = _axis_size(mesh, eqn.params["axes"])
        moved = sum(nbytes(ir.aval_of(a)) for a in eqn.invars)
        return cost.all_reduce(moved, n) if n > 1 else 0.0
    flops, moved = _flops_bytes(eqn)
    return cost.op_duration(flops, moved, _float_dtype(eqn))


# ---------------------------------------------------------------------------------------------
# cut points


def weight_group(path: str) -> str:
    """The module a weight belongs to for cutting: ``layers.3`` for
    ``layers.3.mlp.up_proj.kernel``, the first name (``embed_tokens``) without a number."""
    parts = path.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0]


@dataclasses.dataclass(frozen=True)
class _Analysis:
    """Liveness of the per-device jaxpr (positions: cut before equation ``i``)."""

    recomputable: tuple[bool, ...]  # per equation: depends on no weight
    carried: tuple[tuple[Any, ...], ...]  # per position 0..n: weight-dependent live values
    valid: tuple[bool, ...]  # per position: carries something and splits no weight group
    costs: tuple[float, ...]  # per equation (0 for recomputable ones)


def _analyse(
    jaxpr: ir.ClosedJaxpr, weight_paths: Sequence[str], cost: Any, mesh: jax.sharding.Mesh
) -> _Analysis:
    j = jaxpr.jaxpr
    weights = j.invars[: len(weight_paths)]
    n = len(j.eqns)
    stream: set[Any] = set(weights)  # values that depend on a weight
    recomputable = []
    defined_at: dict[Any, int] = {}
    last_use: dict[Any, int] = {}
    group_span: dict[str, list[int]] = {}
    group_of = {v: weight_group(p) for v, p in zip(weights, weight_paths, strict=True)}
    for k, eqn in enumerate(j.eqns):
        uses = [a for a in eqn.invars if not ir.is_literal(a)]
        dep = any(a in stream for a in uses)
        recomputable.append(not dep and not eqn.effects)
        if dep:
            stream.update(eqn.outvars)
        for a in uses:
            last_use[a] = k
            if a in group_of:
                span = group_span.setdefault(group_of[a], [k, k])
                span[1] = k
        for v in eqn.outvars:
            defined_at[v] = k
    for a in j.outvars:
        if not ir.is_literal(a):
            last_use[a] = n
    carried: list[list[Any]] = [[] for _ in range(n + 1)]
    for v, d in defined_at.items():
        if v in stream and v in last_use:
            for i in range(d + 1, min(last_use[v], n) + 1):
                carried[i].append(v)
    splits = [False] * (n + 1)
    for first, last in group_span.values():
        for i in range(first + 1, last + 1):
            splits[i] = True
    valid = tuple(0 < i < n and bool(carried[i]) and not splits[i] for i in range(n + 1))

    def order(v: Any) -> tuple[str, int]:
        return str(v.aval), defined_at[v]

    costs = tuple(0.0 if recomputable[k] else eqn_cost(e, cost, mesh) for k, e in enumerate(j.eqns))
    return _Analysis(
        recomputable=tuple(recomputable),
        carried=tuple(tuple(sorted(c, key=order)) for c in carried),
        valid=valid,
        costs=costs,
    )


def _signature(values: Sequence[Any]) -> tuple[tuple[tuple[int, ...], str], ...]:
    return tuple((tuple(v.aval.shape), str(v.aval.dtype)) for v in values)


@dataclasses.dataclass(frozen=True)
class CutPoints:
    """The candidate cut positions of one signature and the priced units between them."""

    positions: tuple[int, ...]  # cut before these equations
    carried: tuple[jax.ShapeDtypeStruct, ...]  # what crosses every cut (per micro-batch)
    unit_costs: tuple[float, ...]  # seconds of [0, p_1), [p_1, p_2), ..., [p_K, n)


def cut_points(analysis: _Analysis, num_stages: int, cost: Any) -> CutPoints:
    """The best family of candidate cuts: positions of one carried signature (runs with the
    same carried values collapsed to their first). Only families carrying the fewest values
    compete (one for a transformer: the residual stream); among them, the one whose best
    split has the fastest slowest stage plus one hop wins."""
    n = len(analysis.costs)
    families: dict[Any, list[int]] = collections.defaultdict(list)
    for i in range(1, n):
        fresh = analysis.carried[i] != analysis.carried[i - 1] or not analysis.valid[i - 1]
        if analysis.valid[i] and fresh:  # one position per run of identical carried values
            families[_signature(analysis.carried[i])].append(i)
    prefix = np.concatenate([[0.0], np.cumsum(analysis.costs)])
    fewest = min((len(sig) for sig in families), default=0)
    best: tuple[float, CutPoints] | None = None
    most = 0
    for sig, positions in families.items():
        if len(sig) != fewest:
            continue  # not small: e.g. inside an elementwise chain
        most = max(most, len(positions))
        if len(positions) < num_stages - 1:
            continue
        bounds = [0, *positions, n]
        units = tuple(float(prefix[b] - prefix[a]) for a, b in itertools.pairwise(bounds))
        cuts = stage_cuts(units, num_stages)
        slowest = max(sum(units[a:b]) for a, b in itertools.pairwise(cuts))
        hop = cost.permute(sum(math.prod(s) * np.dtype(d).itemsize for s, d in sig))
        score = slowest + (hop if num_stages > 1 else 0.0)
        carried = tuple(jax.ShapeDtypeStruct(s, d) for s, d in sig)
        if best is None or score < best[0]:
            best = (score, CutPoints(tuple(positions), carried, units))
    if best is None:
        raise ValueError(
            f"pipeline: {num_stages} stages need {num_stages - 1} cut points, but the model "
            f"has at most {most} positions carrying the same {fewest} value(s)"
        )
    return best[1]


# ---------------------------------------------------------------------------------------------
# stages


@dataclasses.dataclass(frozen=True)
class Stage:
    """One pipeline stage: its equations of the per-device jaxpr, weights and price."""

    index: int
    eqns: tuple[int, int]  # [start, stop) in the per-device micro-batch jaxpr
    units: tuple[int, int]  # [start, stop) of the units between cut points
    weight_paths: tuple[str, ...]
    cost_s: float  # predicted seconds per micro-batch
    weight_bytes: int  # this stage's weights on one device (tensor-parallel local)


def _stage_jaxpr(
    jaxpr: ir.ClosedJaxpr,
    analysis: _Analysis,
    start: int,
    stop: int,
    carried_in: Sequence[Any],
    outs: Sequence[Any],
    num_weights: int,
) -> tuple[ir.ClosedJaxpr, list[int], int]:
    """The equations stage [start, stop) needs for ``outs`` (recomputing argument-only
    values); invars ``[its weights..., args..., carried_in...]``. Returns the jaxpr, the
    weight indices and how many equations before ``start`` it recomputes."""
    j = jaxpr.jaxpr
    needed = {a for a in outs if not ir.is_literal(a)}
    keep = []
    recomputed = 0
    for k in range(stop - 1, -1, -1):
        eqn = j.eqns[k]
        if not any(v in needed for v in eqn.outvars):
            continue
        if k < start and not analysis.recomputable[k]:
            continue  # carried in
        keep.append(eqn)
        recomputed += k < start
        needed.update(a for a in eqn.invars if not ir.is_literal(a))
    keep.reverse()
    weights = [i for i, v in enumerate(j.invars[:num_weights]) if v in needed]
    invars = [j.invars[i] for i in weights] + list(j.invars[num_weights:]) + list(carried_in)
    return ir.rebuild(jaxpr, keep, outvars=list(outs), invars=invars), weights, recomputed


@dataclasses.dataclass(frozen=True)
class _Slot:
    """Where one weight sits in its stage's flat buffer of its dtype."""

    weight: int
    dtype: str
    offset: int
    shape: tuple[int, ...]  # local (tensor-parallel) shape


def _layout(
    stage_weights: Sequence[Sequence[int]], local_avals: Sequence[Any]
) -> tuple[list[list[_Slot]], dict[str, int]]:
    """Per stage, each weight's slot; per dtype, the padded buffer length (largest stage)."""
    slots: list[list[_Slot]] = []
    sizes: dict[str, int] = {}
    for ws in stage_weights:
        offsets: dict[str, int] = collections.defaultdict(int)
        row = []
        for w in ws:
            a = local_avals[w]
            d = str(a.dtype)
            row.append(_Slot(w, d, offsets[d], tuple(a.shape)))
            offsets[d] += math.prod(a.shape)
        slots.append(row)
        for d, size in offsets.items():
            sizes[d] = max(sizes.get(d, 0), size)
    return slots, dict(sorted(sizes.items()))


# ---------------------------------------------------------------------------------------------
# the program


@dataclasses.dataclass(frozen=True)
class PPProgram:
    """The per-device program of a pipelined (optionally tensor-parallel) model."""

    traced: Traced
    mesh: jax.sharding.Mesh
    pp_axis: str
    tp_axis: str | None  # None: no tensor parallelism
    num_microbatches: int
    jaxpr: ir.ClosedJaxpr  # per device: the whole shard_map body, all ticks unrolled
    stages: tuple[Stage, ...]
    stage_jaxprs: tuple[ir.ClosedJaxpr, ...]  # per stage, micro-batch shapes
    cuts: CutPoints
    carried: tuple[jax.ShapeDtypeStruct, ...]  # sent stage -> stage per micro-batch
    buffer_specs: tuple[PartitionSpec, ...]  # one flat weight buffer per dtype
    weight_bytes_per_device: int
    total_weight_bytes: int  # every stage's weights on one device (tp-local): no pp
    predicted_s: float  # (m + pp - 1) ticks of the slowest stage plus a hop
    report: PassReport
    _pack: Callable[..., Any] = dataclasses.field(repr=False, compare=False)
    _fn: Callable[..., Any] = dataclasses.field(repr=False, compare=False)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def ticks(self) -> int:
        """GPipe forward: ``m + pp - 1`` ticks."""
        return self.num_microbatches + self.num_stages - 1

    def pack_weights(self, weights: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
        """The per-dtype stage buffers on the mesh (each device gets its stage's shard)."""
        return tuple(self._pack(*weights))

    def run_packed(self, buffers: Sequence[jax.Array], *args: Any) -> Any:
        """Run on buffers from :meth:`pack_weights`; same outputs as the original model."""
        flat, treedef = jax.tree_util.tree_flatten(args)
        if treedef != self.traced.args_treedef:
            raise ValueError(
                f"arguments {treedef} do not match the traced {self.traced.args_treedef}"
            )
        outs = self._fn(*buffers, *flat)
        return jax.tree_util.tree_unflatten(self.traced.out_treedef, outs)

    def __call__(self, weights: Sequence[jax.Array], *args: Any) -> Any:
        """Run the pipelined model (weights in ``traced.weight_paths`` order)."""
        return self.run_packed(self.pack_weights(weights), *args)


def _source(
    program: Traced | TPProgram, ctx: PassContext, m: int
) -> tuple[Traced, ir.ClosedJaxpr, tuple[PartitionSpec, ...] | None, Any]:
    """The per-device jaxpr at micro-batch shapes, and the TP specs (None without TP)."""
    traced = program if isinstance(program, Traced) else program.traced
    leaves = jax.tree_util.tree_flatten_with_path(traced.example_args)[0]
    for path, x in leaves:
        shape = tuple(np.shape(x))
        if not shape or shape[0] % m:
            raise ValueError(
                f"pipeline: argument {jax.tree_util.keystr(path)} of shape {shape}: batch "
                f"dim 0 does not divide into num_microbatches={m}"
            )
    tp = program if isinstance(program, TPProgram) else None
    if m == 1:
        return traced, program.jaxpr, None if tp is None else tp.weight_specs, tp
    micro_args = jax.tree_util.tree_map(lambda x: x[: x.shape[0] // m], traced.example_args)
    micro = traced.at_args(micro_args)
    for k, (full, mb) in enumerate(
        zip(traced.jaxpr.jaxpr.outvars, micro.jaxpr.jaxpr.outvars, strict=True)
    ):
        fs, ms = tuple(full.aval.shape), tuple(mb.aval.shape)
        if not fs or fs != (ms[0] * m, *ms[1:]):
            raise ValueError(f"pipeline: output {k} of shape {fs} is not batch-major")
    if tp is None:
        return traced, micro.jaxpr, None, None
    sub = dataclasses.replace(ctx, mesh=tp.mesh, tp_axis=tp.tp_axis)
    micro_tp = tensor_parallel(micro, sub)
    if micro_tp.weight_specs != tp.weight_specs:
        raise ValueError("pipeline: the micro-batch shapes split the weights differently")
    return traced, micro_tp.jaxpr, micro_tp.weight_specs, micro_tp


def _pad_spec(spec: PartitionSpec | None, ndim: int) -> tuple[Any, ...]:
    entries = tuple(spec) if spec is not None else ()
    return entries + (None,) * (ndim - len(entries))


def _local_block(
    x: np.ndarray, spec: tuple[Any, ...], axis: str | None, rank: int, n: int
) -> np.ndarray:
    """Tensor-parallel rank ``rank``'s block of a global weight."""
    for d, name in enumerate(spec):
        if axis is not None and name == axis:
            size = x.shape[d] // n
            return np.take(x, range(rank * size, (rank + 1) * size), axis=d)
    return x


@dataclasses.dataclass(frozen=True)
class _Buffers:
    """The weight layout: per stage its slots, per dtype one flat buffer ``[pp, (tp,) L]``."""

    slots: tuple[tuple[_Slot, ...], ...]
    sizes: dict[str, int]  # dtype -> L (the largest stage's elements of that dtype)
    spec: PartitionSpec
    tp_axis: str | None
    tp_n: int

    @property
    def dtypes(self) -> list[str]:
        return list(self.sizes)

    def local_shape(self, d: str) -> tuple[int, ...]:
        return (1, self.sizes[d]) if self.tp_axis is None else (1, 1, self.sizes[d])

    @property
    def bytes_per_device(self) -> int:
        return sum(n * np.dtype(d).itemsize for d, n in self.sizes.items())

    def unpack(self, stage: int, flat: Sequence[Any]) -> list[Any]:
        """Slice stage ``stage``'s weights out of this device's flat buffers."""
        return [
            jax.lax.slice(
                flat[self.dtypes.index(sl.dtype)],
                (sl.offset,),
                (sl.offset + math.prod(sl.shape),),
            ).reshape(sl.shape)
            for sl in self.slots[stage]
        ]

    def _row(self, host: Sequence[np.ndarray], specs: Any, d: str, stage: int, rank: int) -> Any:
        parts = [
            _local_block(host[sl.weight], specs[sl.weight], self.tp_axis, rank, self.tp_n).ravel()
            for sl in self.slots[stage]
            if sl.dtype == d
        ]
        flat = np.concatenate(parts) if parts else np.zeros((0,), d)
        return np.pad(flat, (0, self.sizes[d] - flat.shape[0]))

    def pack(
        self,
        weights: Sequence[Any],
        specs: Sequence[tuple[Any, ...]],
        sharding: NamedSharding,
    ) -> tuple[jax.Array, ...]:
        """The buffers of global weights on the mesh; ``specs``: each weight's tp split.

        Built shard by shard on the host: each device receives only its own stage's block.
        """
        host = [np.asarray(w) for w in weights]
        num_stages = len(self.slots)
        out = []
        for d in self.dtypes:
            shape = (
                (num_stages, self.sizes[d])
                if self.tp_axis is None
                else (
                    num_stages,
                    self.tp_n,
                    self.sizes[d],
                )
            )

            def block(index: tuple[slice, ...], d: str = d) -> np.ndarray:
                stages = range(num_stages)[index[0]]
                if self.tp_axis is None:
                    return np.stack([self._row(host, specs, d, s, 0) for s in stages])
                ranks = range(self.tp_n)[index[1]]
                return np.stack(
                    [np.stack([self._row(host, specs, d, s, r) for r in ranks]) for s in stages]
                )

            out.append(jax.make_array_from_callback(shape, sharding, block))
        return tuple(out)


def _gpipe_body(
    stage_jaxprs: Sequence[ir.ClosedJaxpr],
    buffers: _Buffers,
    carried: Sequence[Any],
    out_avals: Sequence[Any],
    pp: str,
    m: int,
) -> Callable[..., list[Any]]:
    """The per-device body: ``(*buffers, *args[m, b, ...]) -> outputs [1, m, b, ...]``.

    Tick ``t``: stage ``s`` runs micro-batch ``t - s`` (an idle branch in the bubble), then
    every carried value moves to stage ``s + 1`` (not after the last tick).
    """
    num_stages = len(stage_jaxprs)
    ticks = m + num_stages - 1
    perm = [(s, s + 1) for s in range(num_stages - 1)]

    def zeros(avals: Sequence[Any]) -> list[Any]:
        return [jnp.zeros(a.shape, a.dtype) for a in avals]

    def branch(s: int) -> Callable[..., Any]:
        fun = ir.jaxpr_fun(stage_jaxprs[s])

        def run(flat: Sequence[Any], args: Sequence[Any], carry: Sequence[Any]) -> Any:
            outs = list(fun(*buffers.unpack(s, flat), *args, *(carry if s > 0 else ())))
            if s < num_stages - 1:
                return outs, zeros(out_avals)
            return zeros(carried), outs

        return run

    def idle(flat: Sequence[Any], args: Sequence[Any], carry: Sequence[Any]) -> Any:
        return zeros(carried), zeros(out_avals)

    branches = [*(branch(s) for s in range(num_stages)), idle]

    def body(*vals: Any) -> list[Any]:
        nb = len(buffers.sizes)
        flat = [b.reshape(-1) for b in vals[:nb]]
        args_m = vals[nb:]
        s = jax.lax.axis_index(pp)
        carry = zeros(carried)
        collected: list[list[Any]] = []
        for t in range(ticks):
            j = t - s
            active = (j >= 0) & (j < m)
            args = [
                jax.lax.dynamic_index_in_dim(a, jnp.clip(j, 0, m - 1), 0, keepdims=False)
                for a in args_m
            ]
            index = jnp.where(active, s, num_stages)
            new_carry, outs = jax.lax.switch(index, branches, flat, args, carry)
            if t >= num_stages - 1:
                collected.append(outs)
            if t < ticks - 1:
                carry = [jax.lax.ppermute(c, pp, perm) for c in new_carry]
        return [jnp.stack([o[k] for o in collected])[None] for k in range(len(out_avals))]

    return body


def _build_stages(
    traced: Traced, jaxpr: ir.ClosedJaxpr, analysis: _Analysis, cuts: CutPoints, num_stages: int
) -> tuple[list[Stage], list[ir.ClosedJaxpr], list[list[int]], int]:
    """Cut the units with :func:`stage_cuts`; each stage's record, jaxpr and weights, and
    how many equations the stages recompute in all."""
    nw = traced.num_weights
    n = len(jaxpr.jaxpr.eqns)
    bounds = stage_cuts(cuts.unit_costs, num_stages)
    positions = (0, *cuts.positions, n)
    local_avals = [v.aval for v in jaxpr.jaxpr.invars[:nw]]
    stages, stage_jaxprs, stage_weights, recomputed = [], [], [], 0
    for s in range(num_stages):
        start, stop = positions[bounds[s]], positions[bounds[s + 1]]
        cin = analysis.carried[start] if s > 0 else ()
        cout = analysis.carried[stop] if s < num_stages - 1 else jaxpr.jaxpr.outvars
        sj, ws, rec = _stage_jaxpr(jaxpr, analysis, start, stop, cin, cout, nw)
        recomputed += rec
        stage_jaxprs.append(sj)
        stage_weights.append(ws)
        stages.append(
            Stage(
                index=s,
                eqns=(start, stop),
                units=(bounds[s], bounds[s + 1]),
                weight_paths=tuple(traced.weight_paths[w] for w in ws),
                cost_s=sum(cuts.unit_costs[bounds[s] : bounds[s + 1]]),
                weight_bytes=sum(nbytes(local_avals[w]) for w in ws),
            )
        )
    return stages, stage_jaxprs, stage_weights, recomputed


def pipeline(program: Traced | TPProgram, ctx: PassContext) -> PPProgram:
    """Cut ``program`` into ``mesh.shape[ctx.pp_axis]`` stages run GPipe-style on that axis.

    ``program`` is a :class:`Traced` (global jaxpr) or a :class:`TPProgram` (per-device
    jaxpr over its tp axis). Raises ValueError naming the value when the pp axis is
    missing from the mesh, the model has fewer cut points than stages need, or a batch
    does not divide into ``ctx.num_microbatches``.
    """
    pp = ctx.pp_axis
    tp = program if isinstance(program, TPProgram) else None
    mesh = tp.mesh if tp is not None and ctx.mesh is None else ctx.mesh
    if pp is None or mesh is None or pp not in mesh.shape:
        axes = None if mesh is None else dict(mesh.shape)
        raise ValueError(f"pipeline: pp_axis={pp!r} is not an axis of the mesh {axes}")
    if tp is not None and mesh.shape.get(tp.tp_axis) != tp.mesh.shape[tp.tp_axis]:
        raise ValueError(
            f"pipeline: the tensor-parallel program splits over {tp.tp_axis!r} of size "
            f"{tp.mesh.shape[tp.tp_axis]}, but the mesh {dict(mesh.shape)} differs"
        )
    num_stages, m = mesh.shape[pp], ctx.num_microbatches
    cost = ctx.cost_model
    if cost is None:
        from ligerjax.cost import CostModel

        cost = CostModel.for_device("cpu")

    traced, jaxpr, tp_specs, tp = _source(program, ctx, m)
    tp_axis = None if tp is None else tp.tp_axis
    nw = traced.num_weights
    analysis = _analyse(jaxpr, traced.weight_paths, cost, mesh)
    cuts = cut_points(analysis, num_stages, cost)
    stages, stage_jaxprs, stage_weights, recomputed = _build_stages(
        traced, jaxpr, analysis, cuts, num_stages
    )
    local_avals = [v.aval for v in jaxpr.jaxpr.invars[:nw]]
    slots, sizes = _layout(stage_weights, local_avals)
    buffers = _Buffers(
        slots=tuple(tuple(row) for row in slots),
        sizes=sizes,
        spec=PartitionSpec(pp, None) if tp_axis is None else PartitionSpec(pp, tp_axis, None),
        tp_axis=tp_axis,
        tp_n=1 if tp_axis is None else mesh.shape[tp_axis],
    )

    # The per-device body, traced once (inspectable), run in one jitted shard_map.
    args_local = [v.aval for v in jaxpr.jaxpr.invars[nw:]]
    out_avals = [v.aval for v in jaxpr.jaxpr.outvars]
    arg_specs = [None] * len(args_local) if tp is None else list(tp.arg_specs)
    out_specs = [None] * len(out_avals) if tp is None else list(tp.out_specs)
    body = _gpipe_body(stage_jaxprs, buffers, cuts.carried, out_avals, pp, m)
    body_avals = [jax.ShapeDtypeStruct(buffers.local_shape(d), d) for d in buffers.dtypes]
    body_avals += [jax.ShapeDtypeStruct((m, *a.shape), a.dtype) for a in args_local]
    per_device = ir.make_jaxpr(body, *body_avals, axis_env=list(mesh.shape.items()))
    body_fun = ir.jaxpr_fun(per_device)
    smap = jax.shard_map(
        lambda *a: tuple(body_fun(*a)),
        mesh=mesh,
        in_specs=(
            *(buffers.spec for _ in buffers.dtypes),
            *(
                PartitionSpec(None, *_pad_spec(sp, len(a.shape)))
                for sp, a in zip(arg_specs, args_local, strict=True)
            ),
        ),
        out_specs=tuple(
            PartitionSpec(pp, None, *_pad_spec(sp, len(a.shape)))
            for sp, a in zip(out_specs, out_avals, strict=True)
        ),
        check_vma=False,
    )
    nb = len(buffers.dtypes)

    @jax.jit
    def fn(*vals: Any) -> list[Any]:
        micro = [x.reshape(m, x.shape[0] // m, *x.shape[1:]) for x in vals[nb:]]
        outs = smap(*vals[:nb], *micro)  # each [pp, m, b, ...]: keep the last stage's
        return [o[-1].reshape(m * o.shape[2], *o.shape[3:]) for o in outs]

    weight_specs = tp_specs if tp_specs is not None else (None,) * nw
    full_specs = [
        _pad_spec(spec, w.ndim) for spec, w in zip(weight_specs, traced.weights, strict=True)
    ]
    sharding = NamedSharding(mesh, buffers.spec)

    def pack(*weights: Any) -> tuple[jax.Array, ...]:
        return buffers.pack(weights, full_specs, sharding)

    ticks = m + num_stages - 1
    hop = cost.permute(sum(nbytes(a) for a in cuts.carried)) if num_stages > 1 else 0.0
    report = PassReport(
        name="pipeline",
        rewrites={
            "stages": num_stages,
            "microbatches": m,
            "ppermute": (ticks - 1) * len(cuts.carried),
            "recomputed_eqns": recomputed,
        },
    )
    return PPProgram(
        traced=traced,
        mesh=mesh,
        pp_axis=pp,
        tp_axis=tp_axis,
        num_microbatches=m,
        jaxpr=per_device,
        stages=tuple(stages),
        stage_jaxprs=tuple(stage_jaxprs),
        cuts=cuts,
        carried=cuts.carried,
        buffer_specs=(buffers.spec,) * nb,
        weight_bytes_per_device=buffers.bytes_per_device,
        total_weight_bytes=sum(nbytes(a) for a in local_avals),
        predicted_s=ticks * (max(st.cost_s for st in stages) + hop),
        report=report,
        _pack=pack,
        _fn=fn,
    )


def pipeline_pass(program: Traced | TPProgram, ctx: PassContext) -> tuple[PPProgram, PassReport]:
    """The pass-manager entry point of :func:`pipeline`."""
    pp = pipeline(program, ctx)
    return pp, pp.report


pipeline_pass.pass_name = "pipeline"  # type: ignore[attr-defined]

__all__ = [
    "CutPoints",
    "PPProgram",
    "Stage",
    "cut_points",
    "pipeline",
    "pipeline_pass",
    "stage_cuts",
]
