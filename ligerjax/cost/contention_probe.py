"""Measure the contention factor: how much slower compute and communication run together.

Liger profiles its contention factors offline, on the cards it will serve on, by running
compute and communication kernels concurrently; the planner then inflates every overlapped
duration by them, and the throughput an interleaved step can gain at a latency budget
hangs on that number (docs/BENCHMARKS.md, interleave). This probe does the profiling on
any mesh: it times three programs made of the same ``windows`` windows, each shaped the
way the emit pass shapes a window of the interleaved step::

    a, y = optimization_barrier((a, y))   # the window opens
    a = psum(a, axis)                     # comm: the all-reduce       [T, E] per device
    y = y @ w  (gemms times)              # compute: the GEMMs inside  [M, E] @ [E, E]
    a, y = optimization_barrier((a, y))   # the window closes

``comm`` keeps only the all-reduces, ``compute`` only the GEMMs, ``both`` keeps both. Each
all-reduce reduces the previous one's result and each GEMM takes the previous product, so
nothing merges or hoists across windows. On GPUs XLA runs each all-reduce as a start/done
pair with the window's GEMMs between them (compiled for the latency-hiding scheduler);
CPU collectives are synchronous, so ``both`` is the two back to back there.

The fit is the planner's and the simulator's model: while they overlap, both kinds run
``f`` times slower. A window whose compute takes ``c`` alone and whose all-reduce takes
``m`` alone then takes ``max(c, m) + (f - 1) * min(c, m)``, so

    f = 1 + (t_both - max(t_compute, t_comm)) / min(t_compute, t_comm)

``f = 1``: free overlap; ``f = 2`` at ``c = m``: none (the two ran back to back). The two
kinds need not suffer alike (on PCIe an all-reduce is bound by the link, which GEMMs do not
use; the GEMMs lose the SMs NCCL holds): with their own factors ``f_c`` and ``f_m``, the
kind that finishes first ends at ``f_c * c`` (or ``f_m * m``) and the other has done
``1 / f_m`` (``1 / f_c``) of that time's work, then runs alone (:func:`window_time`).
:func:`fit_pair` finds the ``(f_c, f_m)`` whose predictions fit every case (least squares
of the relative error over a grid); it is determined only when some cases end with the
compute and others with the all-reduce, so the cases span balances on both sides. Each case
sets the GEMM count so the window's compute is ``ratio`` times its all-reduce (from solo
timings of one GEMM and one all-reduce); the report's factor is the median over cases.
Timings are best of ``repeats`` rounds, round-robin over the programs of a case.
"""

from __future__ import annotations

import functools
import logging
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ligerjax.compiler.deviceless import run_options
from ligerjax.cost.calibration import best_round_robin, loop_timer
from ligerjax.cost.cost_model import Contention
from ligerjax.cost.device_spec import dtype_itemsize, dtype_name

log = logging.getLogger(__name__)

PROGRAMS = ("comm", "compute", "both")


@dataclass(frozen=True)
class WindowShape:
    """What one window holds, per device: an all-reduce of ``[tokens, width]`` and GEMMs
    ``[rows, width] @ [width, width]``, in ``dtype``; ``windows`` windows a program."""

    tokens: int
    width: int
    rows: int
    dtype: str = "float32"
    windows: int = 8

    def __post_init__(self) -> None:
        for name in ("tokens", "width", "rows", "windows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"WindowShape.{name}={value!r}: must be an integer >= 1")
        object.__setattr__(self, "dtype", dtype_name(self.dtype))

    @property
    def all_reduce_bytes(self) -> int:
        """Bytes one device contributes to one all-reduce."""
        return self.tokens * self.width * dtype_itemsize(self.dtype)


def default_shape(platform: str) -> WindowShape:
    """On GPUs a decode-sized primary all-reduce (32 tokens of a 4096-wide model, bf16:
    256 KiB) and prefill-sized secondary GEMMs ``[256, 4096] @ [4096, 4096]``; on CPUs a
    1 MiB f32 all-reduce and ``[16, 512] @ [512, 512]`` GEMMs, small enough that a few
    balance it (a ``[64, 2048] @ [2048, 2048]`` GEMM there takes ~50 times an all-reduce of
    256 KiB)."""
    if platform == "gpu":
        return WindowShape(tokens=32, width=4096, rows=256, dtype="bfloat16")
    return WindowShape(tokens=512, width=512, rows=16, dtype="float32")


def fit_factor(compute_s: float, comm_s: float, both_s: float) -> float:
    """The slowdown ``f`` that makes ``max + (f - 1) * min`` equal ``both_s`` (at least 1:
    a ``both`` faster than the model allows is read as free overlap)."""
    for name, value in (("compute_s", compute_s), ("comm_s", comm_s), ("both_s", both_s)):
        if not value > 0:
            raise ValueError(f"{name}={value}: must be > 0")
    longer, shorter = max(compute_s, comm_s), min(compute_s, comm_s)
    return max(1.0, 1.0 + (both_s - longer) / shorter)


def window_time(compute_s: float, comm_s: float, contention: Contention) -> float:
    """Seconds of a window whose compute takes ``compute_s`` and whose all-reduce takes
    ``comm_s`` alone, both starting together and each slowed by its factor while the
    other runs (the timeline simulator's model)."""
    fc, fm = contention.compute, contention.comm
    if fc * compute_s <= fm * comm_s:  # the compute ends first
        return comm_s + fc * compute_s * (1 - 1 / fm)
    return compute_s + fm * comm_s * (1 - 1 / fc)


PAIR_GRID = tuple(1 + 0.005 * i for i in range(401))  # factors 1.000 ... 3.000


def fit_pair(cases: Sequence[ContentionCase]) -> Contention:
    """The ``(compute, comm)`` factors on :data:`PAIR_GRID` whose :func:`window_time`
    predictions have the least summed squared relative error over ``cases``; among equal
    fits, the most nearly equal pair."""
    import numpy as np

    if not cases:
        raise ValueError("cases: need at least one")
    fc = np.asarray(PAIR_GRID)[:, None]  # [G, 1]
    fm = np.asarray(PAIR_GRID)[None, :]  # [1, G]
    error = np.zeros((len(PAIR_GRID), len(PAIR_GRID)))
    for case in cases:
        c, m = case.compute_s, case.comm_s
        predicted = np.where(fc * c <= fm * m, m + fc * c * (1 - 1 / fm), c + fm * m * (1 - 1 / fc))
        error += ((predicted - case.both_s) / case.both_s) ** 2
    error = np.round(error, 12) + 1e-15 * np.abs(fc - fm)  # ties: the most nearly equal
    i, j = np.unravel_index(np.argmin(error), error.shape)
    return Contention(compute=PAIR_GRID[i], comm=PAIR_GRID[j])


@dataclass(frozen=True)
class ContentionCase:
    """One balance point: GEMMs per window, and seconds per program (all windows)."""

    ratio: float  # the compute : all-reduce balance asked for (the table shows the one got)
    gemms: int
    compute_s: float
    comm_s: float
    both_s: float

    @property
    def factor(self) -> float:
        """:func:`fit_factor` of this case."""
        return fit_factor(self.compute_s, self.comm_s, self.both_s)


@dataclass(frozen=True)
class ContentionReport:
    """The measured cases and the contention factor they give."""

    device_kind: str
    num_devices: int
    shape: WindowShape
    cases: tuple[ContentionCase, ...]
    both_hlo: str  # the compiled ``both`` program of the middle case (its schedule)

    @property
    def factor(self) -> float:
        """The median :attr:`ContentionCase.factor`."""
        return statistics.median(c.factor for c in self.cases)

    @property
    def contention(self) -> Contention:
        """The measured factor for both kinds, as the planner and simulator take it."""
        return Contention(compute=self.factor, comm=self.factor)

    @functools.cached_property
    def pair(self) -> Contention:
        """Separate factors for compute and all-reduce (:func:`fit_pair`)."""
        return fit_pair(self.cases)

    def format(self) -> str:
        """A plain-text table of the cases."""
        s = self.shape
        lines = [
            f"device={self.device_kind.replace(' ', '-')} devices={self.num_devices} "
            f"all_reduce_kib={s.all_reduce_bytes / 1024:.0f} "
            f"gemm={s.rows}x{s.width}x{s.width} dtype={s.dtype} windows={s.windows} "
            f"contention={self.factor:.3f} pair={self.pair.compute:.3f}/{self.pair.comm:.3f}",
            f"{'ratio':>6}{'gemms':>7}{'compute_ms':>12}{'comm_ms':>10}{'both_ms':>10}"
            f"{'balance':>9}{'factor':>8}",
        ]
        for c in self.cases:
            lines.append(
                f"{c.ratio:>6.2f}{c.gemms:>7d}{c.compute_s * 1e3:>12.3f}{c.comm_s * 1e3:>10.3f}"
                f"{c.both_s * 1e3:>10.3f}{c.compute_s / c.comm_s:>9.2f}{c.factor:>8.3f}"
            )
        return "\n".join(lines)


def window_program(
    kind: str, shape: WindowShape, mesh: Any, *, axis: str = "tp", gemms: int = 1
) -> Callable[..., Any]:
    """``(a, y, w) -> (a, y)``, the ``kind`` program (``"comm"``, ``"compute"``, ``"both"``)
    as a ``shard_map`` over ``axis`` of ``mesh`` (not jitted). Its arguments are global
    arrays sharded over ``axis`` along their first dimension: ``a`` ``[n * T, E]``, ``y``
    ``[n * M, E]``, ``w`` ``[n * E, E]``. The all-reduces run under the name scope
    ``primary`` and the GEMMs under ``secondary``, as in the emitted step."""
    import jax
    from jax.sharding import PartitionSpec

    if kind not in PROGRAMS:
        raise ValueError(f"kind={kind!r}: one of {', '.join(PROGRAMS)}")
    if axis not in mesh.shape:
        raise ValueError(f"axis={axis!r}: not an axis of the mesh {dict(mesh.shape)}")
    if isinstance(gemms, bool) or not isinstance(gemms, int) or gemms < 1:
        raise ValueError(f"gemms={gemms!r}: must be an integer >= 1")

    def body(a_te: Any, y_me: Any, w_ee: Any) -> tuple[Any, Any]:
        for _ in range(shape.windows):
            a_te, y_me = jax.lax.optimization_barrier((a_te, y_me))
            if kind != "compute":
                with jax.named_scope("primary"):
                    a_te = jax.lax.psum(a_te, axis)
            if kind != "comm":
                with jax.named_scope("secondary"):
                    for _ in range(gemms):
                        y_me = y_me @ w_ee
            a_te, y_me = jax.lax.optimization_barrier((a_te, y_me))
        return a_te, y_me

    spec = PartitionSpec(axis)
    return jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 3, out_specs=(spec, spec))


def window_structs(shape: WindowShape, mesh: Any, *, axis: str = "tp") -> tuple[Any, ...]:
    """Abstract ``(a, y, w)`` for :func:`window_program`, sharded over ``axis`` of ``mesh``
    (for deviceless compiles)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    n = mesh.shape[axis]
    sharding = NamedSharding(mesh, PartitionSpec(axis))
    return tuple(
        jax.ShapeDtypeStruct((n * rows, shape.width), shape.dtype, sharding=sharding)
        for rows in (shape.tokens, shape.rows, shape.width)
    )


def _window_args(shape: WindowShape, mesh: Any, axis: str) -> tuple[Any, ...]:
    """Random ``(a, y, w)``: unit-scale activations and weights scaled by 1/sqrt(E), so
    the chained products stay finite. The all-reduce chain grows by ``n`` a window."""
    import jax

    keys = jax.random.split(jax.random.key(0), 3)
    out = []
    for key, struct in zip(keys, window_structs(shape, mesh, axis=axis), strict=True):
        x = jax.random.normal(key, struct.shape, dtype=struct.dtype)
        if struct.shape[0] == mesh.shape[axis] * shape.width:
            x = x * (shape.width**-0.5)
        out.append(jax.device_put(x, struct.sharding))
    return tuple(out)


def _compiled(
    kind: str,
    shape: WindowShape,
    mesh: Any,
    axis: str,
    gemms: int,
    args: tuple[Any, ...],
    options: Mapping[str, Any],
) -> Any:
    import jax

    fn = window_program(kind, shape, mesh, axis=axis, gemms=gemms)
    lowered = jax.jit(fn).lower(*args)
    opts: Any = dict(options)
    return lowered.compile(compiler_options=opts) if opts else lowered.compile()


def _per_window(
    kind: str, shape: WindowShape, mesh: Any, axis: str, args: tuple, options: Mapping[str, Any]
) -> float:
    """Seconds of one window of ``kind`` with one GEMM (best of 3 loops)."""
    loop = loop_timer(_compiled(kind, shape, mesh, axis, 1, args, options), args)
    return best_round_robin([loop], 3)[0] / shape.windows


def measure_contention(
    mesh: Any = None,
    *,
    axis: str = "tp",
    shape: WindowShape | None = None,
    ratios: Sequence[float] = (0.5, 1.0, 2.0),
    repeats: int = 5,
    compiler_options: Mapping[str, Any] | None = None,
) -> ContentionReport:
    """Time the ``comm``, ``compute`` and ``both`` programs on ``mesh`` (default: every
    device on ``axis``) at each compute : all-reduce ``ratio`` and fit the contention
    factor. ``compiler_options`` default to the latency-hiding scheduler on GPUs (what the
    emitted step needs on an A100) and none elsewhere."""
    import jax

    if mesh is None:
        mesh = jax.make_mesh((len(jax.devices()),), (axis,))
    if axis not in mesh.shape or mesh.shape[axis] < 2:
        raise ValueError(
            f"axis={axis!r}: the mesh {dict(mesh.shape)} needs at least 2 devices on it "
            "(an all-reduce over one device moves nothing)"
        )
    if not ratios or any(not r > 0 for r in ratios):
        raise ValueError(f"ratios={tuple(ratios)}: need at least one, each > 0")
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: must be >= 1")
    device = mesh.devices.flat[0]
    shape = shape or default_shape(device.platform)
    if compiler_options is None:
        compiler_options = run_options(mesh)
    args = _window_args(shape, mesh, axis)
    comm_window = _per_window("comm", shape, mesh, axis, args, compiler_options)
    gemm_s = _per_window("compute", shape, mesh, axis, args, compiler_options)
    cases, both_hlo = [], ""
    middle = sorted(ratios)[len(ratios) // 2]
    for ratio in ratios:
        gemms = max(1, round(ratio * comm_window / gemm_s))
        programs = [
            _compiled(kind, shape, mesh, axis, gemms, args, compiler_options) for kind in PROGRAMS
        ]
        loops = [loop_timer(p, args) for p in programs]
        comm_s, compute_s, both_s = best_round_robin(loops, repeats)
        cases.append(ContentionCase(float(ratio), gemms, compute_s, comm_s, both_s))
        if ratio == middle:
            both_hlo = programs[2].as_text() or ""
        log.info("contention case %s", cases[-1])
    report = ContentionReport(
        device_kind=device.device_kind,
        num_devices=int(mesh.shape[axis]),
        shape=shape,
        cases=tuple(cases),
        both_hlo=both_hlo,
    )
    log.info("contention probe:\n%s", report.format())
    return report
