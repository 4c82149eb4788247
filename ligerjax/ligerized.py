"""``ligerize``: the decorator users put on their Flax models.

```python
lm = ligerize(model, mesh=mesh)              # an nnx.Module instance
logits = lm(tokens)                          # the parallel program, same outputs
p_out, s_out = lm.interleaved((decode_tokens,), (prefill_tokens,))   # one XLA program
lm.plan((decode_tokens,), (prefill_tokens,), target="h100").pprint()

@ligerize(mesh=mesh)                         # a class: instances come out ligerized
class MyModel(nnx.Module): ...

@ligerize(mesh=mesh)                         # a function fn(model, *args)
def step(model, tokens): return model(tokens)[0]
step(model, tokens); step.interleaved(model, (p,), (s,))
```

One call traces the model's step to a jaxpr (weights as arguments) and runs the passes:
``attention`` → ``tensor_parallel`` → ``pipeline`` (with ``pp_axis``). ``interleaved``
traces the step of both batches into one jaxpr and, on a tensor-parallel mesh, adds
``assemble`` → ``decompose`` → ``interleave`` → ``emit``: one XLA program in which the
primary's all-reduces run while the secondary computes. Programs are compiled once per
argument shape and cached; weights stay jit arguments, read from the model at every call.

This is the front door: the only core module besides ``api.py`` that imports ``passes``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from ligerjax.compiler import PassContext, PassManager, Traced, ir, trace_module
from ligerjax.compiler.deviceless import run_options
from ligerjax.compiler.pass_manager import dump_dir_of, dump_jaxpr
from ligerjax.cost import CostModel, device_for_kind
from ligerjax.plan import Schedule
from ligerjax.schedule import Schedule as LaunchOrder
from ligerjax.schedule import run_to_completion, simulate
from passes.assemble import assemble
from passes.attention import attention, attention_pass
from passes.decompose import decompose
from passes.emit import PRIMARY_SCOPE, emit
from passes.interleave import DEFAULT_FACTOR, StepPlan, interleave
from passes.pipeline import pipeline_pass
from passes.tensor_parallel import TPProgram, tensor_parallel, tensor_parallel_pass

log = logging.getLogger(__name__)

Rules = tuple[tuple[str, int | None], ...]

# plan(target=...) → the cost-model device of that target.
PLAN_TARGETS = {"cpu": "cpu", "h100": "h100-sxm", "a100": "a100-sxm", "a100-pcie": "a100-pcie"}


@dataclasses.dataclass(frozen=True)
class LigerizeConfig:
    """The keyword arguments of :func:`ligerize`, validated.

    ``strict``: a split value reaching a primitive with no split rule raises instead of
    being all-gathered. ``max_inflation`` bounds how much the secondary may delay the
    primary (a fraction of its solo step time: contention slowdown plus window overrun);
    ``max_factor`` is the decomposition granularity (a secondary op is cut at multiples of
    1/max_factor).
    """

    mesh: jax.sharding.Mesh | None = None
    tp_axis: str = "tp"
    pp_axis: str | None = None
    interleave: bool = True
    partition_rules: Rules = ()
    cost_model: CostModel | None = None
    passes: tuple[Any, ...] | None = None
    num_microbatches: int = 1
    strict: bool = False
    max_inflation: float = 0.05
    max_factor: int = DEFAULT_FACTOR

    def __post_init__(self) -> None:
        if self.mesh is not None and not isinstance(self.mesh, jax.sharding.Mesh):
            raise ValueError(f"ligerize: mesh={self.mesh!r} is not a jax.sharding.Mesh")
        axes = tuple(self.mesh.axis_names) if self.mesh is not None else ()
        for name in ("tp_axis", "pp_axis"):
            axis = getattr(self, name)
            if axis is not None and self.mesh is not None and axis not in axes:
                if name == "tp_axis" and self.pp_axis is not None:
                    continue  # a pure pipeline mesh
                raise ValueError(f"ligerize: {name}={axis!r} is not an axis of the mesh {axes}")
        object.__setattr__(self, "partition_rules", tuple(self.partition_rules or ()))
        for rule in self.partition_rules:
            if not (isinstance(rule, tuple) and len(rule) == 2 and isinstance(rule[0], str)):
                raise ValueError(
                    f"ligerize: partition rule {rule!r} is not a (regex, dim | None) pair"
                )
            re.compile(rule[0])
        if self.passes is not None:
            object.__setattr__(self, "passes", tuple(self.passes))
        if self.cost_model is not None and not isinstance(self.cost_model, CostModel):
            raise ValueError(f"ligerize: cost_model={self.cost_model!r} is not a CostModel")
        if not self.max_inflation >= 0:
            raise ValueError(f"ligerize: max_inflation={self.max_inflation}: must be >= 0")
        for name in ("max_factor", "num_microbatches"):
            if getattr(self, name) < 1:
                raise ValueError(f"ligerize: {name}={getattr(self, name)}: must be >= 1")

    def resolved_mesh(self) -> jax.sharding.Mesh:
        """The mesh, defaulting to every device on ``tp_axis``."""
        if self.mesh is not None:
            return self.mesh
        return jax.make_mesh(
            (len(jax.devices()),), (self.tp_axis,), axis_types=(jax.sharding.AxisType.Auto,)
        )


def ligerize(target: Any = None, /, **kwargs: Any) -> Any:
    """Make a Flax NNX model run tensor/pipeline-parallel with interleaved batches.

    ``target`` is an ``nnx.Module`` instance (returns a :class:`Ligerized`), an
    ``nnx.Module`` class (returns a factory whose instances come out ligerized) or a
    function ``fn(model, *args)`` (returns a :class:`LigerizedFunction`); without a target,
    a decorator. Keywords: ``mesh`` (default: every device on axis ``"tp"``), ``tp_axis``,
    ``pp_axis``, ``interleave``, ``partition_rules`` (``(regex, dim | None)`` pairs matched
    against parameter paths, before the defaults), ``cost_model``, ``passes`` (replace the
    default pass list), and the :class:`LigerizeConfig` knobs.
    """
    config = LigerizeConfig(**kwargs)
    if target is None:
        return functools.partial(_ligerize, config=config)
    return _ligerize(target, config=config)


def _ligerize(target: Any, *, config: LigerizeConfig) -> Any:
    if isinstance(target, type) and issubclass(target, nnx.Module):
        return _ligerized_class(target, config)
    if isinstance(target, nnx.Module):
        return Ligerized(target, config=config)
    if callable(target):
        return LigerizedFunction(target, config=config)
    raise ValueError(
        f"ligerize: target={target!r} is neither an nnx.Module (class or instance) nor a "
        "function fn(model, *args)"
    )


def _ligerized_class(cls: type[nnx.Module], config: LigerizeConfig) -> Callable[..., Ligerized]:
    @functools.wraps(cls, updated=())
    def make(*args: Any, **kwargs: Any) -> Ligerized:
        return Ligerized(cls(*args, **kwargs), config=config)

    return make


# -- argument checks ----------------------------------------------------------------------


def _signature(args: Sequence[Any]) -> tuple[Any, ...]:
    leaves, treedef = jax.tree_util.tree_flatten(tuple(args))
    return (
        treedef,
        tuple((tuple(jax.numpy.shape(x)), str(jax.numpy.result_type(x))) for x in leaves),
    )


def check_pair(primary_args: Any, secondary_args: Any) -> None:
    """ValueError naming the mismatch unless the two batches are calls of the same step:
    tuples of the same structure whose leaves agree in rank and dtype (sizes may differ)."""
    for name, a in (("primary_args", primary_args), ("secondary_args", secondary_args)):
        if not isinstance(a, tuple):
            raise ValueError(f"interleaved: {name} must be a tuple of arguments, got {type(a)}")
    p_leaves, p_tree = jax.tree_util.tree_flatten(primary_args)
    s_leaves, s_tree = jax.tree_util.tree_flatten(secondary_args)
    if p_tree != s_tree:
        raise ValueError(
            f"interleaved: primary_args {p_tree} and secondary_args {s_tree} differ in structure"
        )
    for i, (p, s) in enumerate(zip(p_leaves, s_leaves, strict=True)):
        p_shape, s_shape = jax.numpy.shape(p), jax.numpy.shape(s)
        if len(p_shape) != len(s_shape):
            raise ValueError(
                f"interleaved: argument {i} has {len(p_shape)} dims in the primary batch "
                f"{p_shape} but {len(s_shape)} in the secondary {s_shape}"
            )
        pd, sd = jax.numpy.result_type(p), jax.numpy.result_type(s)
        if pd != sd:
            raise ValueError(
                f"interleaved: argument {i} is {pd} in the primary but {sd} in the secondary"
            )


# -- the interleaved program --------------------------------------------------------------


class OptionedJit:
    """``fn`` jitted with XLA ``options`` when called at the top level, and without them
    when called under another trace (inside a user's ``jax.jit``: a nested jit may not carry
    compiler options; the enclosing jit's own options apply there)."""

    def __init__(self, fn: Callable[..., Any], options: Mapping[str, Any]) -> None:
        opts: Any = dict(options)
        self._top = jax.jit(fn, compiler_options=opts)
        self._nested = jax.jit(fn)

    def __call__(self, *args: Any) -> Any:
        leaves = jax.tree_util.tree_leaves(args)
        traced = any(isinstance(x, jax.core.Tracer) for x in leaves)
        return (self._nested if traced else self._top)(*args)


@dataclasses.dataclass(frozen=True)
class InterleavedProgram:
    """Both batches' step as one per-device program on the mesh."""

    traced: Traced
    tp: TPProgram
    step: StepPlan
    jaxpr: ir.ClosedJaxpr
    mesh: jax.sharding.Mesh
    fn: Callable[..., Any] = dataclasses.field(repr=False)  # the shard_map, not jitted

    @property
    def in_specs(self) -> tuple[PartitionSpec, ...]:
        return (*self.tp.weight_specs, *self.tp.arg_specs)

    @functools.cached_property
    def run(self) -> OptionedJit:
        """``fn`` jitted for the mesh's own devices (:func:`run_options`)."""
        return OptionedJit(self.fn, run_options(self.mesh))

    def __call__(
        self, weights: Sequence[jax.Array], primary_args: tuple, secondary_args: tuple
    ) -> Any:
        flat = jax.tree_util.tree_leaves((primary_args, secondary_args))
        outs = self.run(*self.tp.shard_weights(weights), *flat)
        return jax.tree_util.tree_unflatten(self.traced.out_treedef, outs)

    def arg_structs(self) -> list[jax.ShapeDtypeStruct]:
        """Abstract inputs (weights, then both batches) with their shardings on the mesh."""
        avals = [v.aval for v in self.traced.jaxpr.jaxpr.invars]
        return [
            jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(self.mesh, spec))
            for a, spec in zip(avals, self.in_specs, strict=True)
        ]


def build_interleaved(
    traced: Traced,
    num_primary_leaves: int,
    config: LigerizeConfig,
    mesh: jax.sharding.Mesh,
    cost: CostModel,
    *,
    barriers: bool = True,
) -> InterleavedProgram:
    """The two-batch step through attention → tensor_parallel → assemble → interleave →
    decompose → emit. Without ``barriers`` nothing is cut or tied: the same equations in
    plan order, for XLA to schedule on its own (the peer the measures are judged against)."""
    ctx = PassContext(
        mesh=mesh,
        tp_axis=config.tp_axis,
        partition_rules=config.partition_rules,
        strict=config.strict,
    )
    tp = tensor_parallel(attention(traced, ctx), ctx)
    n = mesh.shape[config.tp_axis]
    axis_env = [(config.tp_axis, n)]
    nw = traced.num_weights
    n_args = len(traced.jaxpr.jaxpr.invars) - nw
    roles: list[str | None] = [None] * nw
    roles += ["primary"] * num_primary_leaves + ["secondary"] * (n_args - num_primary_leaves)
    asm = assemble(tp.jaxpr, roles, cost, {config.tp_axis: n})
    step = interleave(
        asm, cost, factor=config.max_factor if barriers else 1, max_inflation=config.max_inflation
    )
    dec = decompose(step, axis_env)
    emitted = emit(dec, step, axis_env, barriers=barriers)
    dump_dir = dump_dir_of(ctx)
    if dump_dir:
        stages = [("traced", traced.jaxpr), ("tensor_parallel", tp.jaxpr)]
        stages += [("decompose", dec.jaxpr), ("emit", emitted.jaxpr)]
        for i, (name, jaxpr) in enumerate(stages):
            dump_jaxpr(dump_dir, i, f"interleaved_{name}", jaxpr)
    body = ir.jaxpr_fun(emitted.jaxpr)
    fn = jax.shard_map(
        lambda *a: tuple(body(*a)),
        mesh=mesh,
        in_specs=(*tp.weight_specs, *tp.arg_specs),
        out_specs=tp.out_specs,
        check_vma=False,
    )
    return InterleavedProgram(traced, tp, step, emitted.jaxpr, mesh, fn)


def cost_model_for(mesh: jax.sharding.Mesh, fallback: str = "a100-sxm") -> CostModel:
    """The cost model of ``mesh``'s devices (:func:`~ligerjax.cost.device_for_kind`); a
    device no table describes is planned as ``fallback``, with a warning."""
    kind = mesh.devices.flat[0].device_kind
    name = device_for_kind(kind)
    if name is None:
        log.warning(
            "no cost table for device kind %r: planning as %r; pass ligerize(cost_model=...) "
            "built from a DeviceSpec of this device for plans that fit it",
            kind,
            fallback,
        )
        name = fallback
    return CostModel.for_device(name)


# -- the ligerized model ------------------------------------------------------------------


def _pair_call(call: Callable[..., Any] | None, num_primary: int) -> Callable[..., Any]:
    def both(model: Any, *args: Any) -> Any:
        p, s = args[:num_primary], args[num_primary:]
        run = (lambda m, *a: m(*a)) if call is None else call
        return run(model, *p), run(model, *s)

    return both


class Ligerized:
    """A model whose calls run the parallel program (see :func:`ligerize`)."""

    def __init__(
        self, model: nnx.Module, *, config: LigerizeConfig, call: Callable[..., Any] | None = None
    ) -> None:
        self.model = model
        self.config = config
        self._call = call
        self._programs: dict[Any, Any] = {}

    def __repr__(self) -> str:
        mesh = self.config.resolved_mesh()
        return f"Ligerized({type(self.model).__name__}, mesh={dict(mesh.shape)})"

    # -- what users call ---------------------------------------------------------------

    def __call__(self, *args: Any) -> Any:
        """The model's outputs for ``args``, computed with the parallel program."""
        return self._one(args)(self._weights(), *args)

    def interleaved(self, primary_args: tuple, secondary_args: tuple) -> tuple[Any, Any]:
        """``(model(*primary_args), model(*secondary_args))`` as one XLA program in which
        the primary's collectives overlap the secondary's compute."""
        check_pair(primary_args, secondary_args)
        key = ("pair", _signature(primary_args), _signature(secondary_args))
        program = self._cached(key, lambda: self._build_pair(primary_args, secondary_args))
        flat = (*primary_args, *secondary_args)
        if isinstance(program, (InterleavedProgram, PipelinePair)):
            return program(self._weights(), primary_args, secondary_args)
        return program(self._weights(), *flat)

    def plan(
        self,
        primary_args: tuple,
        secondary_args: tuple,
        *,
        target: str = "cpu",
        num_devices: int | None = None,
        barriers: bool = True,
    ) -> Schedule:
        """Plan and compile the interleaved step for ``target`` ("cpu", "h100", "a100",
        "a100-pcie"; GPU targets compile deviceless) on ``num_devices`` tensor-parallel
        devices (default: the mesh's ``tp`` size) and read the schedule back.
        ``barriers=False`` compiles the same step without the emit pass's measures."""
        from ligerjax.compiler import deviceless
        from ligerjax.schedule import hlo_schedule

        check_pair(primary_args, secondary_args)
        if target not in PLAN_TARGETS:
            raise ValueError(f"plan: target={target!r}: one of {', '.join(PLAN_TARGETS)}")
        if self.config.pp_axis is not None:
            raise ValueError("plan: interleaving plans are for tensor parallelism (pp_axis=None)")
        n = num_devices or self.config.resolved_mesh().shape[self.config.tp_axis]
        if n < 1:
            raise ValueError(f"plan: num_devices={num_devices}: must be >= 1")
        cost = self.config.cost_model or CostModel.for_device(PLAN_TARGETS[target])
        if target == "cpu":
            devices = jax.devices()
            if n > len(devices):
                raise ValueError(f"plan: num_devices={n} but this machine has {len(devices)}")
            mesh = jax.sharding.Mesh(devices[:n], (self.config.tp_axis,))
        else:
            mesh = deviceless.gpu_mesh(target, n, axis_names=(self.config.tp_axis,))
        traced = self._trace_pair(primary_args, secondary_args)
        num_p = len(jax.tree_util.tree_leaves(primary_args))
        program = build_interleaved(traced, num_p, self.config, mesh, cost, barriers=barriers)
        compiled = deviceless.compile_text(program.fn, *program.arg_structs(), target=target)
        coverage = hlo_schedule.overlap_coverage(
            compiled.text, cost, is_primary=hlo_schedule.is_primary_scope(PRIMARY_SCOPE)
        )
        return _schedule(program, target, n, cost, compiled, coverage, barriers)

    # -- building ----------------------------------------------------------------------

    def _cached(self, key: Any, build: Callable[[], Any]) -> Any:
        if key not in self._programs:
            self._programs[key] = build()
        return self._programs[key]

    def _weights(self) -> list[jax.Array]:
        _, state = nnx.split(self.model)
        return jax.tree_util.tree_leaves(state)

    def _ctx(self) -> PassContext:
        c = self.config
        return PassContext(
            mesh=c.resolved_mesh(),
            tp_axis=c.tp_axis,
            pp_axis=c.pp_axis,
            num_microbatches=c.num_microbatches,
            cost_model=c.cost_model,
            partition_rules=c.partition_rules,
            strict=c.strict,
        )

    def _passes(self) -> tuple[Any, ...]:
        if self.config.passes is not None:
            return self.config.passes
        return default_passes(self.config)

    def _build_one(self, args: Sequence[Any]) -> Any:
        traced = trace_module(self.model, *args, call=self._call)
        program, _ = PassManager(self._passes()).run(traced, self._ctx())
        return program

    def _trace_pair(self, primary_args: tuple, secondary_args: tuple) -> Traced:
        both = _pair_call(self._call, len(primary_args))
        return trace_module(self.model, *primary_args, *secondary_args, call=both)

    def _one(self, args: tuple) -> Any:
        return self._cached(("one", _signature(args)), lambda: self._build_one(args))

    def _build_pair(self, primary_args: tuple, secondary_args: tuple) -> Any:
        c = self.config
        if c.pp_axis is not None and c.passes is None:
            return PipelinePair(self._one(primary_args), self._one(secondary_args))
        traced = self._trace_pair(primary_args, secondary_args)
        if c.passes is None:
            cost = c.cost_model or cost_model_for(c.resolved_mesh())
            num_p = len(jax.tree_util.tree_leaves(primary_args))
            mesh = c.resolved_mesh()
            return build_interleaved(traced, num_p, c, mesh, cost, barriers=c.interleave)
        program, _ = PassManager(self._passes()).run(traced, self._ctx())
        return program


class PipelinePair:
    """Two batches through their pipelined programs inside one jitted XLA program.

    The pipeline pass cuts one chain of layers; the two batches are two chains, so each gets
    its own stage program (the cut may differ with the shapes) and one ``jax.jit`` runs
    both, leaving the overlap to XLA's scheduler: compiled for GPUs it makes most of one
    batch's collective-permutes async around the other's stage compute, but its permute
    combiner may merge the two batches' hops, and no latency budget bounds a window
    (docs/BENCHMARKS.md, "Pipeline parallelism, read back"). The planner and the emit pass's
    barrier ties are for tensor parallelism only.
    """

    def __init__(self, primary: Any, secondary: Any) -> None:
        self.primary, self.secondary = primary, secondary
        self._same_cut = [st.weight_paths for st in primary.stages] == [
            st.weight_paths for st in secondary.stages
        ]

        def both(bp: Any, bs: Any, p_args: tuple, s_args: tuple) -> tuple[Any, Any]:
            return primary.run_packed(bp, *p_args), secondary.run_packed(bs, *s_args)

        self._fn = OptionedJit(both, run_options(primary.mesh))

    def __call__(
        self, weights: Sequence[jax.Array], primary_args: tuple, secondary_args: tuple
    ) -> Any:
        bp = self.primary.pack_weights(weights)
        bs = bp if self._same_cut else self.secondary.pack_weights(weights)
        return self._fn(bp, bs, primary_args, secondary_args)


def default_passes(config: LigerizeConfig) -> tuple[Any, ...]:
    """attention → tensor_parallel (when the mesh has ``tp_axis``) → pipeline (with
    ``pp_axis``)."""
    out: list[Any] = [attention_pass]
    if config.tp_axis in config.resolved_mesh().shape:
        out.append(tensor_parallel_pass)
    if config.pp_axis is not None:
        out.append(pipeline_pass)
    return tuple(out)


class LigerizedFunction:
    """``fn(model, *args)`` ligerized: the model is the first argument of every call."""

    def __init__(self, fn: Callable[..., Any], *, config: LigerizeConfig) -> None:
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.config = config
        self._bound: dict[int, Ligerized] = {}

    def bind(self, model: nnx.Module) -> Ligerized:
        """The ligerized step of this ``model`` (cached per model object)."""
        if not isinstance(model, nnx.Module):
            raise ValueError(f"{self.fn.__name__}: first argument {model!r} is not an nnx.Module")
        key = id(model)
        if key not in self._bound or self._bound[key].model is not model:
            self._bound[key] = Ligerized(model, config=self.config, call=self.fn)
        return self._bound[key]

    def __call__(self, model: nnx.Module, *args: Any) -> Any:
        return self.bind(model)(*args)

    def interleaved(self, model: nnx.Module, primary_args: tuple, secondary_args: tuple) -> Any:
        return self.bind(model).interleaved(primary_args, secondary_args)

    def plan(
        self, model: nnx.Module, primary_args: tuple, secondary_args: tuple, **kw: Any
    ) -> Schedule:
        return self.bind(model).plan(primary_args, secondary_args, **kw)


def _schedule(
    program: InterleavedProgram,
    target: str,
    n: int,
    cost: CostModel,
    compiled: Any,
    coverage: Any,
    barriers: bool,
) -> Schedule:
    step = program.step
    asm = step.assembled
    timeline = simulate(step.plan.schedule, cost.contention)
    sequential = simulate(LaunchOrder.sequential([asm.primary, asm.secondary]), cost.contention)
    return Schedule(
        target=target,
        num_devices=n,
        primary=step.primary,
        secondary=step.secondary,
        switch_points=step.primary.switch_points(),
        matched_pairs=step.matched_pairs,
        decomposition=step.factors,
        timeline=timeline,
        sequential=sequential,
        hlo_text=compiled.text,
        coverage=coverage,
        planned_coverage=step.coverage,
        compile_s=compiled.compile_s,
        sustained=run_to_completion(asm.primary, asm.secondary, cost=cost, config=step.config),
        barriers=barriers,
    )
