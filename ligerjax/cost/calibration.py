"""Calibrate a device table from measured op timings, and report the prediction error.

On this machine (no GPU) the CPU table is fitted: a few GEMMs of varied shapes and a few
streaming elementwise ops are compiled with JAX and timed (best of ``repeats``, each a
loop long enough to read the clock reliably). The fit is three numbers:

* launch latency: the time of a one-element add (per-call dispatch, which is what a
  separately launched op pays);
* compute efficiency: the median over GEMMs of ``flops / (peak * (t - launch))``;
* memory efficiency: the median over elementwise ops of ``bytes / (bw * (t - launch))``.

The cases are timed round-robin (one loop of each per round, the best of ``repeats``
rounds kept), so load from other processes on a shared machine hits them alike.

An efficiency above 1 (the table's nominal peak was too low, e.g. data served from cache)
raises the peak instead, so the fitted spec stays valid. The report then predicts every op
with the fitted roofline and gives the error per op and the mean absolute percentage error.
These timings are from a shared machine: they vary run to run.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ligerjax.cost.cost_model import Contention, CostModel
from ligerjax.cost.device_spec import DeviceSpec, dtype_itemsize, dtype_name, get_device

log = logging.getLogger(__name__)

CaseKind = Literal["launch", "gemm", "elementwise"]


@dataclass(frozen=True)
class CalibrationCase:
    """One timed op: a GEMM ``[m, k] @ [k, n]``, an elementwise op over ``size`` elements
    (``op``: ``"add"`` x+y, ``"axpy"`` a*x+y, ``"scale"`` 2x), or the launch probe."""

    name: str
    kind: CaseKind
    m: int = 1
    k: int = 1
    n: int = 1
    size: int = 1
    op: str = "add"

    def __post_init__(self) -> None:
        if self.kind not in ("launch", "gemm", "elementwise"):
            raise ValueError(f"CalibrationCase.kind={self.kind!r}: launch, gemm or elementwise")
        for name in ("m", "k", "n", "size"):
            if getattr(self, name) < 1:
                raise ValueError(f"CalibrationCase.{name}={getattr(self, name)}: must be >= 1")
        if self.op not in ("add", "axpy", "scale"):
            raise ValueError(f"CalibrationCase.op={self.op!r}: add, axpy or scale")

    def flops(self) -> float:
        """FLOPs of the op."""
        if self.kind == "gemm":
            return 2.0 * self.m * self.k * self.n
        return {"add": 1.0, "axpy": 2.0, "scale": 1.0}[self.op] * self.size

    def bytes(self, itemsize: int) -> float:
        """Bytes read and written (operands in, result out, each once)."""
        if self.kind == "gemm":
            return float(itemsize * (self.m * self.k + self.k * self.n + self.m * self.n))
        arrays = {"add": 3, "axpy": 3, "scale": 2}[self.op]
        return float(itemsize * arrays * self.size)


def default_cases() -> tuple[CalibrationCase, ...]:
    """GEMMs from square to skinny, elementwise ops from 1 MiB to 16 MiB per array. Larger
    outputs (32 MiB and up) are freshly mapped by the allocator on every call and time the
    page faults (~5 GB/s here), not the op."""
    return (
        CalibrationCase("launch", "launch"),
        CalibrationCase("gemm 256x256x256", "gemm", 256, 256, 256),
        CalibrationCase("gemm 512x512x512", "gemm", 512, 512, 512),
        CalibrationCase("gemm 1024x1024x1024", "gemm", 1024, 1024, 1024),
        CalibrationCase("gemm 128x4096x1024", "gemm", 128, 4096, 1024),
        CalibrationCase("gemm 2048x512x512", "gemm", 2048, 512, 512),
        CalibrationCase("gemm 32x4096x4096", "gemm", 32, 4096, 4096),
        CalibrationCase("add 2^18", "elementwise", size=1 << 18, op="add"),
        CalibrationCase("add 2^20", "elementwise", size=1 << 20, op="add"),
        CalibrationCase("scale 2^21", "elementwise", size=1 << 21, op="scale"),
        CalibrationCase("axpy 2^22", "elementwise", size=1 << 22, op="axpy"),
        CalibrationCase("add 2^22", "elementwise", size=1 << 22, op="add"),
    )


@dataclass(frozen=True)
class CalibrationRow:
    """One op: what it does, how long it took, what the fitted model predicts."""

    name: str
    kind: CaseKind
    flops: float
    bytes: float
    measured_s: float
    predicted_s: float

    @property
    def error_pct(self) -> float:
        """Signed prediction error, percent of the measurement."""
        return 100.0 * (self.predicted_s - self.measured_s) / self.measured_s


@dataclass(frozen=True)
class CalibrationReport:
    """The fitted device table and the per-op prediction error."""

    device: DeviceSpec
    rows: tuple[CalibrationRow, ...]

    @property
    def mean_abs_pct_error(self) -> float:
        """Mean absolute percentage error of the fitted roofline over the timed ops."""
        return statistics.fmean(abs(r.error_pct) for r in self.rows)

    def format(self) -> str:
        """A plain-text table of the fit."""
        d = self.device
        lines = [
            f"device={d.name} launch_us={d.launch_latency * 1e6:.1f} "
            f"compute_efficiency={d.compute_efficiency:.3f} "
            f"memory_efficiency={d.memory_efficiency:.3f} "
            f"memory_bandwidth_gbs={d.memory_bandwidth / 1e9:.1f} "
            f"mean_abs_pct_error={self.mean_abs_pct_error:.1f}",
            f"{'op':<24}{'measured_ms':>12}{'predicted_ms':>14}{'error_%':>9}",
        ]
        for r in self.rows:
            lines.append(
                f"{r.name:<24}{r.measured_s * 1e3:>12.4f}{r.predicted_s * 1e3:>14.4f}"
                f"{r.error_pct:>9.1f}"
            )
        return "\n".join(lines)


def _build(case: CalibrationCase, dtype: str) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    import jax
    import jax.numpy as jnp

    key = jax.random.key(0)
    ka, kb = jax.random.split(key)
    if case.kind == "gemm":
        a = jax.random.normal(ka, (case.m, case.k), dtype=dtype)  # [M, K]
        b = jax.random.normal(kb, (case.k, case.n), dtype=dtype)  # [K, N]
        return jax.jit(jnp.matmul), (a, b)
    size = 1 if case.kind == "launch" else case.size
    x = jax.random.normal(ka, (size,), dtype=dtype)
    y = jax.random.normal(kb, (size,), dtype=dtype)
    if case.op == "scale":
        return jax.jit(lambda x: x * 2), (x,)
    if case.op == "axpy":
        return jax.jit(lambda x, y: 3 * x + y), (x, y)
    return jax.jit(jnp.add), (x, y)


def loop_timer(fn: Callable[..., Any], args: tuple[Any, ...]) -> Callable[[], float]:
    """Warm ``fn(*args)`` up (compiling it); return a function timing one loop of calls
    (seconds per call), the loop long enough (>= ~2 ms) to read the clock reliably."""
    import jax

    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    once = max(time.perf_counter() - start, 1e-7)
    inner = max(1, min(1000, int(2e-3 / once)))

    def loop() -> float:
        start = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        return (time.perf_counter() - start) / inner

    return loop


def best_round_robin(loops: Sequence[Callable[[], float]], repeats: int) -> tuple[float, ...]:
    """Best of ``repeats`` rounds per loop, one run of each loop per round, so a burst of
    load from other processes on a shared machine hits every loop alike instead of one
    loop's whole series."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: must be >= 1")
    best = [float("inf")] * len(loops)
    for _ in range(repeats):
        for i, loop in enumerate(loops):
            best[i] = min(best[i], loop())
    return tuple(best)


def measure_all(
    cases: Sequence[CalibrationCase], *, dtype: Any = "float32", repeats: int = 5
) -> tuple[float, ...]:
    """Best-of-``repeats`` seconds per call of each case, timed round-robin
    (:func:`best_round_robin`)."""
    loops = [loop_timer(*_build(case, dtype_name(dtype))) for case in cases]
    return best_round_robin(loops, repeats)


def measure(case: CalibrationCase, *, dtype: Any = "float32", repeats: int = 5) -> float:
    """Best-of-``repeats`` seconds per call of ``case``, compiled, after a warm-up."""
    return measure_all((case,), dtype=dtype, repeats=repeats)[0]


def _fit_rate(
    amounts: Sequence[float], times: Sequence[float], launch: float, peak: float
) -> tuple[float, float]:
    """(peak, efficiency) with ``amount / (peak * eff) = time - launch`` at the median."""
    rates = [a / max(t - launch, 1e-9) for a, t in zip(amounts, times, strict=True)]
    rate = statistics.median(rates)
    if rate > peak:  # the nominal peak was too low: raise it rather than exceed 1
        return rate, 1.0
    return peak, rate / peak


def calibrate(
    device: DeviceSpec | str = "cpu",
    *,
    cases: Sequence[CalibrationCase] | None = None,
    dtype: Any = "float32",
    repeats: int = 5,
    measured: Sequence[float] | None = None,
) -> CalibrationReport:
    """Time ``cases`` (default :func:`default_cases`) on the default JAX backend and fit
    ``device``'s launch latency and efficiencies. ``measured`` (seconds per case) skips the
    timing, to refit recorded numbers. One ``launch`` case, at least one GEMM and at least
    one elementwise case are needed."""
    spec = get_device(device)
    cases = tuple(default_cases() if cases is None else cases)
    kinds = [c.kind for c in cases]
    for need in ("launch", "gemm", "elementwise"):
        if need not in kinds:
            raise ValueError(f"cases: need at least one {need!r} case (got {kinds})")
    dtype = dtype_name(dtype)
    itemsize = dtype_itemsize(dtype)
    if measured is None:
        times = list(measure_all(cases, dtype=dtype, repeats=repeats))
    else:
        if len(measured) != len(cases):
            raise ValueError(f"measured: {len(measured)} timings for {len(cases)} cases")
        times = [float(t) for t in measured]
        for t in times:
            if not t > 0:
                raise ValueError(f"measured={t}: timings must be > 0")

    launch = min(t for c, t in zip(cases, times, strict=True) if c.kind == "launch")
    gemm = [(c, t) for c, t in zip(cases, times, strict=True) if c.kind == "gemm"]
    elem = [(c, t) for c, t in zip(cases, times, strict=True) if c.kind == "elementwise"]
    peak, compute_eff = _fit_rate(
        [c.flops() for c, _ in gemm], [t for _, t in gemm], launch, spec.peak(dtype)
    )
    bandwidth, memory_eff = _fit_rate(
        [c.bytes(itemsize) for c, _ in elem], [t for _, t in elem], launch, spec.memory_bandwidth
    )
    peaks = tuple((d, peak if d == dtype else f) for d, f in spec.peak_flops)
    fitted = spec.replace(
        peak_flops=peaks,
        memory_bandwidth=bandwidth,
        launch_latency=launch,
        compute_efficiency=compute_eff,
        memory_efficiency=memory_eff,
    )
    model = CostModel(fitted, Contention.none())
    rows = tuple(
        CalibrationRow(
            name=c.name,
            kind=c.kind,
            flops=c.flops(),
            bytes=c.bytes(itemsize),
            measured_s=t,
            predicted_s=model.op_duration(c.flops(), c.bytes(itemsize), dtype),
        )
        for c, t in zip(cases, times, strict=True)
    )
    report = CalibrationReport(fitted, rows)
    log.info("calibration of %s:\n%s", spec.name, report.format())
    return report
