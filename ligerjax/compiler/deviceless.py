"""Compile for a GPU without one (deviceless AOT) and hand back the scheduled HLO text.

With the ``aot`` extra (``pip install 'ligerjax[aot]'``: ``jax-cuda12-plugin`` and
``jax-cuda12-pjrt``, no CUDA libraries needed) and ``JAX_PLATFORMS=cpu``, JAX builds a GPU
topology from a ``GpuTargetConfigProto`` text file and compiles for it on this CPU-only
machine::

    mesh = gpu_mesh("h100", 4)                                   # 1 slice x 1 host x 4 GPUs
    x = jax.ShapeDtypeStruct((32, 4096), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
    out = compile_text(jax.shard_map(step, mesh=mesh, ...), x, ..., target="h100")
    out.text                                                     # scheduled GPU HLO

The entry computation's instruction order in ``out.text`` is the schedule XLA's
latency-hiding scheduler chose; :mod:`ligerjax.schedule.hlo_schedule` reads it back. Target
``"cpu"`` compiles on the real (or virtual) CPU devices through the same call, so callers
have one path; CPU collectives are synchronous (no overlap).

Measured facts (2026-11-30, jax 0.10.2, jax-cuda12-plugin 0.10.2, deviceless, this machine):

* XLA options go through ``jax.jit(f).lower(...).compile(compiler_options={...})`` and take
  effect: on the A100 target the entry computation carries ``scheduling_name=`` metadata
  only with ``xla_gpu_enable_latency_hiding_scheduler=True`` (and the primary all-reduce
  encloses the secondary GEMMs only then). Values must have their Python type: the string
  ``"true"`` is rejected ("not a valid bool value"), so :func:`normalize_flags` converts
  ``"true"``/``"false"``; an unknown name fails with "No such compile option".
* ``jax.named_scope("primary")`` around a ``jax.lax.psum`` inside ``jax.shard_map`` survives
  into the scheduled H100 (and A100) HLO: ``all-reduce-start`` and ``all-reduce-done`` carry
  ``metadata={op_name="jit(step)/shard_map/primary/psum_invariant" ...}``; GEMM fusions carry
  ``.../secondary/dot_general``; an async ``call-start`` from ``compute_on`` carries
  ``.../secondary/jit(sec)``. **Except** when XLA's all-reduce combiner merges a primary and a
  secondary all-reduce (both batches psum in one step and nothing separates them): the
  combined ``all-reduce-start`` has no ``op_name`` at all (only ``scheduling_name``), its
  operand is a ``wrapped_concatenate`` of both batches, and it is ``"is_sync":true``. The
  emitter must therefore keep the two batches' collectives apart (disable
  ``all-reduce-combiner`` and set ``xla_gpu_all_reduce_combine_threshold_bytes=0``, or tie the
  batches with ``optimization_barrier``); :mod:`ligerjax.schedule.hlo_schedule` recovers the
  scopes of such a collective from its operands (``Instr.scopes``), so a merged one is seen
  as both primary and secondary rather than as neither.
* On the H100 target every collective kind comes out as a start/done pair:
  ``all-gather-start/done``, ``reduce-scatter-start/done``, ``all-to-all-start/done``,
  ``collective-permute-start/done`` (XLA marks a pair ``"is_sync":true`` when nothing can
  overlap it). A ``compute_on("gpu_stream:1")`` jitted function becomes
  ``call-start/call-done`` with ``_xla_stream_annotation="1"``.
* Compile seconds on this 2-core machine for a 4-device step (a 32-token primary MLP pair
  with its psum and a 2048-token secondary pair of [4096, 4096] bf16 GEMMs): H100 ~0.9 s,
  A100 ~0.65 s; topology + mesh ~0.1 s. A 7B-like 2-layer TP=4 step (hidden 4096, ffn 11008,
  bf16, primary 32 tokens, secondary 2048 tokens, shared weights, with
  ``xla_disable_hlo_passes="dot-merger,all-reduce-combiner"`` and
  ``xla_gpu_all_reduce_combine_threshold_bytes=0``): ~950 lines of HLO, compile 6.9 s (H100)
  and 6.7 s (A100), parse + coverage 0.1 s. Every primary all-reduce was async and covered
  (coverage 1.0), but the compute XLA put in each ~13 us (H100) / ~17 us (A100) window
  overran it by 15-240 us (H100) and 540-670 us (A100): ``Coverage.overrun_s``.
"""

from __future__ import annotations

import importlib.resources
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

import jax
from jax.sharding import AxisType, Mesh, NamedSharding

log = logging.getLogger(__name__)

AOT_HINT = "pip install 'ligerjax[aot]'"
FlagValue = bool | int | float | str


class Target(NamedTuple):
    """A compile target: its GpuTargetConfigProto file (``None``: the host CPU), the XLA
    options it needs, and the :class:`~ligerjax.cost.CostModel` device that prices it."""

    config_file: str | None
    flags: Mapping[str, FlagValue]
    cost_device: str


_LHS: Mapping[str, FlagValue] = MappingProxyType({"xla_gpu_enable_latency_hiding_scheduler": True})
TARGETS: Mapping[str, Target] = MappingProxyType(
    {
        # H100 runs the latency-hiding scheduler by default.
        "h100": Target("h100_sxm.txtpb", MappingProxyType({}), "h100-sxm"),
        # A100 needs it switched on.
        "a100": Target("a100_sxm_80.txtpb", _LHS, "a100-sxm"),
        # Same chip; the cost model prices its PCIe links.
        "a100-pcie": Target("a100_sxm_80.txtpb", _LHS, "a100-pcie"),
        "cpu": Target(None, MappingProxyType({}), "cpu"),
    }
)


def run_options(mesh: Mesh) -> dict[str, FlagValue]:
    """XLA options to run on ``mesh``'s own devices what :func:`compile_text` compiles for a
    GPU target: the latency-hiding scheduler on GPUs (an A100 runs without it by default,
    and then no collective encloses any compute), nothing on CPUs."""
    return dict(_LHS) if mesh.devices.flat[0].platform == "gpu" else {}


def get_target(target: str) -> Target:
    """``TARGETS[target]``; ``ValueError`` listing the known targets otherwise."""
    try:
        return TARGETS[target]
    except (KeyError, TypeError):
        raise ValueError(
            f"target={target!r}: unknown (known: {', '.join(sorted(TARGETS))})"
        ) from None


def target_config_text(target: str) -> str:
    """The GpuTargetConfigProto text of a GPU ``target``, read from the package data."""
    config_file = get_target(target).config_file
    if config_file is None:
        raise ValueError(f"target={target!r}: the host CPU has no GPU target config")
    resource = importlib.resources.files("ligerjax.compiler.targets") / config_file
    return resource.read_text(encoding="utf-8")


def _device_description(config_text: str) -> str | None:
    for line in config_text.splitlines():
        key, _, value = line.strip().partition(":")
        if key == "device_description_str":
            return value.strip().strip('"')
    return None


def normalize_flags(flags: Mapping[str, Any] | None) -> dict[str, FlagValue]:
    """XLA options as ``compile(compiler_options=...)`` takes them: names without ``--``,
    ``"true"``/``"false"`` as bools (XLA rejects the strings for bool options)."""
    out: dict[str, FlagValue] = {}
    for name, value in (flags or {}).items():
        key = name.removeprefix("--")
        if not key:
            raise ValueError(f"flags: empty option name {name!r}")
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        if not isinstance(value, bool | int | float | str):
            raise ValueError(f"flags[{name!r}]={value!r}: must be a bool, int, float or str")
        out[key] = value
    return out


def xla_flags_string(flags: Mapping[str, FlagValue]) -> str:
    """``flags`` in ``XLA_FLAGS`` form (``--name=value``), for running on a real GPU."""
    parts = []
    for name, value in flags.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        parts.append(f"--{name}={text}")
    return " ".join(parts)


def _topologies() -> Any:
    try:
        import jax_plugins.xla_cuda12  # noqa: F401
    except ImportError as err:
        raise ImportError(f"deviceless GPU compiles need the CUDA PJRT plugin: {AOT_HINT}") from err
    from jax.experimental import topologies

    return topologies


def _mesh_shape(
    num_devices: int, axis_names: Sequence[str], shape: Sequence[int] | None
) -> tuple[int, ...]:
    if isinstance(num_devices, bool) or int(num_devices) != num_devices or num_devices < 1:
        raise ValueError(f"num_devices={num_devices}: must be an integer >= 1")
    if shape is None:
        if len(axis_names) != 1:
            raise ValueError(f"axis_names={tuple(axis_names)}: give shape= for several axes")
        shape = (int(num_devices),)
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(axis_names):
        raise ValueError(f"shape={shape} and axis_names={tuple(axis_names)}: lengths differ")
    size = 1
    for s in shape:
        size *= s
    if size != num_devices:
        raise ValueError(f"shape={shape}: holds {size} devices, not num_devices={num_devices}")
    return shape


def gpu_mesh(
    target: str,
    num_devices: int,
    axis_names: Sequence[str] = ("tp",),
    shape: Sequence[int] | None = None,
) -> Mesh:
    """A mesh of ``num_devices`` deviceless GPUs of ``target`` on one host (topology
    ``1x1x{num_devices}``), axes ``axis_names`` of ``shape`` (default: one axis)."""
    config = get_target(target)
    if config.config_file is None:
        raise ValueError(f"target={target!r}: not a GPU target (use jax.make_mesh for the CPU)")
    mesh_shape = _mesh_shape(num_devices, axis_names, shape)
    topologies = _topologies()
    topology = topologies.get_topology_desc(
        platform="cuda",
        target_config=target_config_text(target),
        topology=f"1x1x{int(num_devices)}",
    )
    return topologies.make_mesh(topology, mesh_shape, tuple(axis_names))


def cpu_mesh(
    num_devices: int, axis_names: Sequence[str] = ("tp",), shape: Sequence[int] | None = None
) -> Mesh:
    """A mesh over the first ``num_devices`` CPU devices (Auto axes), like :func:`gpu_mesh`."""
    mesh_shape = _mesh_shape(num_devices, axis_names, shape)
    devices = jax.devices("cpu")
    if len(devices) < num_devices:
        raise ValueError(
            f"num_devices={num_devices}: only {len(devices)} CPU devices "
            "(set XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts)"
        )
    return jax.make_mesh(
        mesh_shape,
        tuple(axis_names),
        axis_types=(AxisType.Auto,) * len(mesh_shape),
        devices=devices[:num_devices],
    )


def target_mesh(
    target: str,
    num_devices: int,
    axis_names: Sequence[str] = ("tp",),
    shape: Sequence[int] | None = None,
) -> Mesh:
    """:func:`gpu_mesh` for a GPU target, :func:`cpu_mesh` for ``"cpu"``."""
    if get_target(target).config_file is None:
        return cpu_mesh(num_devices, axis_names, shape)
    return gpu_mesh(target, num_devices, axis_names, shape)


@dataclass(frozen=True)
class CompiledText:
    """The scheduled HLO of one compile, how long it took and the XLA options it used."""

    text: str
    target: str
    compile_s: float
    lower_s: float
    flags: Mapping[str, FlagValue] = field(default_factory=dict)

    @property
    def xla_flags(self) -> str:
        """The options in ``XLA_FLAGS`` form."""
        return xla_flags_string(self.flags)


def _check_shardings(arg_structs: Sequence[Any], target: str) -> None:
    """Each struct's mesh must be of ``target``'s devices (an H100 mesh for "h100", ...)."""
    config = get_target(target)
    want = None if config.config_file is None else _device_description(target_config_text(target))
    for i, struct in jax.tree_util.tree_leaves_with_path(arg_structs):
        sharding = getattr(struct, "sharding", None)
        if sharding is None:
            continue
        if not isinstance(sharding, NamedSharding):
            raise ValueError(
                f"arg_structs{jax.tree_util.keystr(i)}: sharding must be a NamedSharding "
                f"on a mesh of target {target!r}, got {type(sharding).__name__}"
            )
        device = sharding.mesh.devices.flat[0]
        if config.config_file is None:
            ok = device.platform == "cpu"
        else:
            ok = device.platform == "gpu" and (want is None or device.device_kind == want)
        if not ok:
            raise ValueError(
                f"arg_structs{jax.tree_util.keystr(i)}: mesh of {device.device_kind!r} "
                f"({device.platform}) is not target {target!r}; build it with "
                f"target_mesh({target!r}, n)"
            )


def compile_text(
    fn: Callable[..., Any],
    *arg_structs: Any,
    target: str,
    flags: Mapping[str, Any] | None = None,
) -> CompiledText:
    """Compile ``jax.jit(fn)`` at ``arg_structs`` (``jax.ShapeDtypeStruct``s whose
    ``NamedSharding``s sit on a :func:`target_mesh` of ``target``) with the target's XLA
    options updated by ``flags``; return the scheduled HLO text and the compile time."""
    config = get_target(target)
    used = {**normalize_flags(config.flags), **normalize_flags(flags)}
    _check_shardings(arg_structs, target)
    if config.config_file is not None:
        _topologies()
    start = time.perf_counter()
    lowered = jax.jit(fn).lower(*arg_structs)
    lowered_at = time.perf_counter()
    # jax types compiler_options as str | bool values; XLA takes ints and floats too.
    options: Any = used
    compiled = lowered.compile(compiler_options=options) if used else lowered.compile()
    done = time.perf_counter()
    text = compiled.as_text()
    if text is None:
        raise RuntimeError(f"target={target!r}: the compiled executable has no HLO text")
    log.info("compiled for %s in %.2f s with %s", target, done - lowered_at, used)
    return CompiledText(
        text=text,
        target=target,
        compile_s=done - lowered_at,
        lower_s=lowered_at - start,
        flags=MappingProxyType(used),
    )
