"""Roofline op durations, ring collectives, contention factors and NCCL settings.

Durations (seconds) on one device of a :class:`~ligerjax.cost.device_spec.DeviceSpec`:

* an op: ``launch + max(flops / (peak[dtype] * compute_eff), bytes / (mem_bw * memory_eff))``;
* a ring all-reduce of ``bytes`` over ``n`` devices: ``2(n-1)/n * bytes / bw + α(n-1)``,
  with ``bw = link_bandwidth * link_efficiency``; all-gather and reduce-scatter move half
  of that, ``(n-1)/n * bytes / bw + α(n-1)`` (``bytes`` is the full, gathered size); a
  point-to-point permute is ``bytes / bw + α``.

Contention: compute and communication share SMs, DRAM bandwidth and power, so each runs
slower while the other is running. :class:`Contention` holds the two slowdown factors (>= 1)
a planner inflates durations by and the timeline simulator applies to overlapped time.
Liger's prototype used one flat efficiency of 0.8 (a secondary kernel may fill 80% of a
window): ``Contention.flat(0.8)``, a 1.25x slowdown for both.

On NVIDIA GPUs, ``NCCL_MAX_NCHANNELS`` and ``NCCL_NTHREADS`` bound the SMs (one block per
channel) and threads that NCCL kernels take, leaving the rest to the other batch's GEMMs.
:func:`apply_nccl_env` sets them in ``os.environ``; NCCL reads them when it creates its
communicators, so call it before JAX initialises its GPU backend (before the first
``jax.devices()`` or computation) — on other machines it does nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ligerjax.cost.device_spec import DeviceSpec, get_device

log = logging.getLogger(__name__)

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "permute")
NCCL_THREAD_CHOICES = (64, 128, 256, 512)  # the values NCCL_NTHREADS accepts


def _check_nonneg(name: str, value: float) -> float:
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"{name}={value}: must be >= 0")
    return float(value)


def _check_group(n: int) -> int:
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"n={n}: the number of devices must be an integer >= 1")
    return int(n)


@dataclass(frozen=True)
class Contention:
    """Slowdown factors (>= 1) of an op while the other kind of op runs on its device.

    ``compute``: a compute kernel overlapped with communication takes ``compute`` times
    longer; ``comm``: a collective overlapped with compute takes ``comm`` times longer.
    """

    compute: float = 1.25
    comm: float = 1.25

    def __post_init__(self) -> None:
        for name in ("compute", "comm"):
            value = getattr(self, name)
            if not value >= 1:
                raise ValueError(f"Contention.{name}={value}: a slowdown must be >= 1")

    @classmethod
    def flat(cls, efficiency: float = 0.8) -> Contention:
        """Both kinds run at ``efficiency`` of their solo speed when overlapped (Liger: 0.8)."""
        if not 0 < efficiency <= 1:
            raise ValueError(f"efficiency={efficiency}: must be in (0, 1]")
        return cls(compute=1 / efficiency, comm=1 / efficiency)

    @classmethod
    def none(cls) -> Contention:
        """Perfectly independent resources: overlap costs nothing."""
        return cls(compute=1.0, comm=1.0)

    def factor(self, kind: str) -> float:
        """The slowdown of ``kind`` (``"compute"`` or ``"comm"``) when overlapped."""
        if kind == "compute":
            return self.compute
        if kind == "comm":
            return self.comm
        raise ValueError(f"kind={kind!r}: must be 'compute' or 'comm'")


@dataclass(frozen=True)
class CostModel:
    """Roofline and ring-collective durations on one device, plus contention factors."""

    device: DeviceSpec
    contention: Contention = field(default_factory=Contention)

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", get_device(self.device))
        if not isinstance(self.contention, Contention):
            raise ValueError(f"contention={self.contention!r}: must be a Contention")

    @classmethod
    def for_device(cls, name: str, contention: Contention | None = None) -> CostModel:
        """The cost model of ``DEVICES[name]``."""
        return cls(get_device(name), contention if contention is not None else Contention())

    # -- compute -------------------------------------------------------------------------

    def compute_time(self, flops: float, dtype: Any = "float16") -> float:
        """Seconds for ``flops`` at the device's effective peak for ``dtype``."""
        flops = _check_nonneg("flops", flops)
        return flops / (self.device.peak(dtype) * self.device.compute_efficiency)

    def memory_time(self, bytes: float) -> float:
        """Seconds to move ``bytes`` through device memory at the effective bandwidth."""
        bytes = _check_nonneg("bytes", bytes)
        return bytes / (self.device.memory_bandwidth * self.device.memory_efficiency)

    def op_duration(self, flops: float, bytes: float, dtype: Any = "float16") -> float:
        """Roofline duration of one kernel: launch latency plus the slower of compute and
        memory traffic."""
        return self.device.launch_latency + max(
            self.compute_time(flops, dtype), self.memory_time(bytes)
        )

    def is_compute_bound(self, flops: float, bytes: float, dtype: Any = "float16") -> bool:
        """Whether the FLOPs, not the bytes, set the roofline duration."""
        return self.compute_time(flops, dtype) >= self.memory_time(bytes)

    # -- communication -------------------------------------------------------------------

    @property
    def link_bandwidth(self) -> float:
        """Effective per-direction link bandwidth (bytes/s) collectives see."""
        return self.device.link_bandwidth * self.device.link_efficiency

    def all_reduce(self, bytes: float, n: int) -> float:
        """Ring all-reduce of a ``bytes``-sized buffer over ``n`` devices."""
        bytes, n = _check_nonneg("bytes", bytes), _check_group(n)
        if n == 1:
            return 0.0
        return 2 * (n - 1) / n * bytes / self.link_bandwidth + self.device.link_latency * (n - 1)

    def all_gather(self, bytes: float, n: int) -> float:
        """Ring all-gather whose gathered output is ``bytes`` (each device holds bytes/n)."""
        bytes, n = _check_nonneg("bytes", bytes), _check_group(n)
        if n == 1:
            return 0.0
        return (n - 1) / n * bytes / self.link_bandwidth + self.device.link_latency * (n - 1)

    def reduce_scatter(self, bytes: float, n: int) -> float:
        """Ring reduce-scatter of a ``bytes``-sized input (each device keeps bytes/n)."""
        return self.all_gather(bytes, n)

    def permute(self, bytes: float) -> float:
        """Point-to-point send of ``bytes`` to one neighbour (``ppermute``, pipeline hop)."""
        bytes = _check_nonneg("bytes", bytes)
        return bytes / self.link_bandwidth + self.device.link_latency

    def comm_duration(self, collective: str, bytes: float, n: int) -> float:
        """Duration of ``collective`` (one of :data:`COLLECTIVES`) over ``n`` devices."""
        if collective == "all_reduce":
            return self.all_reduce(bytes, n)
        if collective == "all_gather":
            return self.all_gather(bytes, n)
        if collective == "reduce_scatter":
            return self.reduce_scatter(bytes, n)
        if collective == "permute":
            _check_group(n)
            return self.permute(bytes)
        raise ValueError(f"collective={collective!r}: must be one of {', '.join(COLLECTIVES)}")

    # -- contention ----------------------------------------------------------------------

    def inflate(self, duration_s: float, kind: str) -> float:
        """``duration_s`` of a ``kind`` op ("compute" or "comm") when run overlapped."""
        duration_s = _check_nonneg("duration_s", duration_s)
        return duration_s * self.contention.factor(kind)


# -- NCCL ------------------------------------------------------------------------------------


def nccl_env(num_channels: int, num_threads: int) -> dict[str, str]:
    """The NCCL variables that cap communication's SM use: ``num_channels`` blocks (one SM
    each) of ``num_threads`` threads (64, 128, 256 or 512)."""
    if isinstance(num_channels, bool) or int(num_channels) != num_channels or num_channels < 1:
        raise ValueError(f"num_channels={num_channels}: must be an integer >= 1")
    if num_threads not in NCCL_THREAD_CHOICES:
        raise ValueError(
            f"num_threads={num_threads}: NCCL accepts {', '.join(map(str, NCCL_THREAD_CHOICES))}"
        )
    return {"NCCL_MAX_NCHANNELS": str(int(num_channels)), "NCCL_NTHREADS": str(int(num_threads))}


def nvidia_gpu_present(environ: MutableMapping[str, str] | None = None) -> bool:
    """Whether this host has an NVIDIA driver and JAX is not pinned to other platforms."""
    env = os.environ if environ is None else environ
    platforms = env.get("JAX_PLATFORMS", "").lower()
    if platforms and not any(p in platforms for p in ("cuda", "gpu")):
        return False
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidia0").exists()


def apply_nccl_env(
    num_channels: int,
    num_threads: int,
    *,
    environ: MutableMapping[str, str] | None = None,
    nvidia: bool | None = None,
) -> dict[str, str]:
    """Set :func:`nccl_env`'s variables in ``environ`` (default ``os.environ``) when the
    host has an NVIDIA GPU (``nvidia`` overrides the check). Returns what was set, ``{}``
    elsewhere. Call it before JAX initialises its backends: NCCL reads the variables when
    it creates communicators, and XLA creates them on the first collective."""
    env = os.environ if environ is None else environ
    settings = nccl_env(num_channels, num_threads)
    if not (nvidia_gpu_present(env) if nvidia is None else nvidia):
        log.info("no NVIDIA GPU: NCCL settings %s not applied", settings)
        return {}
    env.update(settings)
    log.info("NCCL settings applied: %s", settings)
    return settings
