"""Device tables for the cost model: peak rates, bandwidths and efficiency factors.

A :class:`DeviceSpec` holds what a roofline needs: peak FLOP/s per dtype, memory (HBM)
bandwidth, the per-direction bandwidth and per-step latency α of the link that ring
collectives use, a kernel launch latency, and three efficiency factors (the fraction of a
peak that real kernels reach). Peaks are the vendors' public datasheet numbers, cited
beside each entry; efficiency factors and α are typical measured fractions, not datasheet
values, and :mod:`ligerjax.cost.calibration` refits them from timings where hardware exists.

``DEVICES`` maps a name to its spec; :func:`get_device` looks one up and raises
``ValueError`` naming an unknown name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

# Short spellings accepted wherever a dtype is named.
_DTYPE_ALIASES: Mapping[str, str] = MappingProxyType(
    {
        "fp16": "float16",
        "f16": "float16",
        "half": "float16",
        "bf16": "bfloat16",
        "fp32": "float32",
        "f32": "float32",
        "float": "float32",
        "fp64": "float64",
        "f64": "float64",
        "fp8": "float8_e4m3fn",
        "tf32": "tensorfloat32",
    }
)


def dtype_name(dtype: Any) -> str:
    """Canonical name of ``dtype`` (a string such as ``"bf16"``, a NumPy or JAX dtype)."""
    if isinstance(dtype, str):
        name = dtype.strip().lower()
        return _DTYPE_ALIASES.get(name, name)
    attr = getattr(dtype, "name", None)
    if isinstance(attr, str):
        return attr
    try:
        return np.dtype(dtype).name
    except TypeError as err:
        raise ValueError(f"dtype={dtype!r}: not a dtype") from err


def dtype_itemsize(dtype: Any) -> int:
    """Bytes per element of ``dtype`` (bfloat16 and the float8s included)."""
    name = dtype_name(dtype)
    try:
        return int(np.dtype(name).itemsize)
    except TypeError:
        import ml_dtypes  # noqa: F401  (registers bfloat16 and float8 with NumPy)

        return int(np.dtype(name).itemsize)


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator (or this machine's CPU) as the cost model sees it.

    Rates are per device, in FLOP/s and bytes/s; ``link_bandwidth`` is per direction,
    which is what one step of a ring collective moves. ``link_latency`` is α, the fixed
    cost per ring step. Efficiencies are in (0, 1].
    """

    name: str
    vendor: str  # "nvidia" or "cpu": only NVIDIA devices get NCCL settings
    peak_flops: tuple[tuple[str, float], ...]  # (dtype name, FLOP/s), dense
    memory_bandwidth: float  # bytes/s (HBM, or DRAM for the CPU)
    link_bandwidth: float  # bytes/s per direction, per device, for ring collectives
    link_latency: float  # α: seconds per ring step
    launch_latency: float  # seconds added to every kernel
    memory_bytes: float  # capacity
    compute_efficiency: float = 0.7  # fraction of peak FLOP/s large GEMMs reach
    memory_efficiency: float = 0.8  # fraction of memory bandwidth streaming kernels reach
    link_efficiency: float = 0.8  # fraction of link bandwidth collectives reach

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("DeviceSpec.name: must not be empty")
        if self.vendor not in ("nvidia", "cpu"):
            raise ValueError(f"DeviceSpec.vendor={self.vendor!r}: must be 'nvidia' or 'cpu'")
        if not self.peak_flops:
            raise ValueError(f"DeviceSpec({self.name}).peak_flops: must name at least one dtype")
        object.__setattr__(
            self, "peak_flops", tuple((dtype_name(d), float(f)) for d, f in self.peak_flops)
        )
        for dtype, flops in self.peak_flops:
            if not flops > 0:
                raise ValueError(
                    f"DeviceSpec({self.name}).peak_flops[{dtype}]={flops}: must be > 0"
                )
        for field in ("memory_bandwidth", "link_bandwidth", "memory_bytes"):
            value = getattr(self, field)
            if not value > 0:
                raise ValueError(f"DeviceSpec({self.name}).{field}={value}: must be > 0")
        for field in ("link_latency", "launch_latency"):
            value = getattr(self, field)
            if not value >= 0:
                raise ValueError(f"DeviceSpec({self.name}).{field}={value}: must be >= 0")
        for field in ("compute_efficiency", "memory_efficiency", "link_efficiency"):
            value = getattr(self, field)
            if not 0 < value <= 1:
                raise ValueError(f"DeviceSpec({self.name}).{field}={value}: must be in (0, 1]")

    @property
    def dtypes(self) -> tuple[str, ...]:
        """The dtypes this table has a peak for."""
        return tuple(d for d, _ in self.peak_flops)

    def peak(self, dtype: Any) -> float:
        """Peak dense FLOP/s for ``dtype``; ``ValueError`` naming a dtype the table lacks."""
        name = dtype_name(dtype)
        for d, flops in self.peak_flops:
            if d == name:
                return flops
        raise ValueError(f"dtype={name!r}: no peak for {self.name} (has {', '.join(self.dtypes)})")

    def replace(self, **changes: Any) -> DeviceSpec:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)


_GB = 1e9
_TFLOPS = 1e12

# NVIDIA A100 80GB PCIe, datasheet (nvidia.com "NVIDIA A100 Tensor Core GPU", 2021):
# FP16/BF16 Tensor Core 312 TFLOPS dense, TF32 156, FP32 19.5, FP64 9.7 (19.5 Tensor Core);
# HBM2e 1,935 GB/s; PCIe Gen4 64 GB/s (32 GB/s each way); 300 W. With 4 cards on PCIe and no
# NVLink bridge, NCCL rings cross the PCIe fabric: nccl-tests bus bandwidth is typically
# ~60% of 32 GB/s (hence link_efficiency 0.6), α ~10 us per hop. The 300 W cap keeps
# large FP16 GEMMs near 70% of peak.
A100_PCIE = DeviceSpec(
    name="a100-pcie",
    vendor="nvidia",
    peak_flops=(
        ("float16", 312 * _TFLOPS),
        ("bfloat16", 312 * _TFLOPS),
        ("tensorfloat32", 156 * _TFLOPS),
        ("float32", 19.5 * _TFLOPS),
        ("float64", 19.5 * _TFLOPS),
        ("int8", 624 * _TFLOPS),
    ),
    memory_bandwidth=1935 * _GB,
    link_bandwidth=32 * _GB,
    link_latency=10e-6,
    launch_latency=4e-6,
    memory_bytes=80 * _GB,
    compute_efficiency=0.7,
    memory_efficiency=0.8,
    link_efficiency=0.6,
)

# NVIDIA A100 80GB SXM4, same datasheet: 312 TFLOPS FP16 dense, HBM2e 2,039 GB/s,
# NVLink 3 600 GB/s (300 GB/s each way) through NVSwitch; 400 W.
A100_SXM = DeviceSpec(
    name="a100-sxm",
    vendor="nvidia",
    peak_flops=(
        ("float16", 312 * _TFLOPS),
        ("bfloat16", 312 * _TFLOPS),
        ("tensorfloat32", 156 * _TFLOPS),
        ("float32", 19.5 * _TFLOPS),
        ("float64", 19.5 * _TFLOPS),
        ("int8", 624 * _TFLOPS),
    ),
    memory_bandwidth=2039 * _GB,
    link_bandwidth=300 * _GB,
    link_latency=5e-6,
    launch_latency=4e-6,
    memory_bytes=80 * _GB,
    compute_efficiency=0.75,
    memory_efficiency=0.8,
    link_efficiency=0.75,
)

# NVIDIA V100 SXM2 32GB, datasheet ("NVIDIA Tesla V100 GPU Accelerator", 2018): Tensor
# (FP16) 125 TFLOPS, FP32 15.7, FP64 7.8; HBM2 900 GB/s; NVLink 2 300 GB/s (150 GB/s each
# way, six links). In a DGX-1 hybrid cube-mesh a 4-GPU ring uses fewer links than that.
V100_NVLINK = DeviceSpec(
    name="v100-nvlink",
    vendor="nvidia",
    peak_flops=(
        ("float16", 125 * _TFLOPS),
        ("float32", 15.7 * _TFLOPS),
        ("float64", 7.8 * _TFLOPS),
    ),
    memory_bandwidth=900 * _GB,
    link_bandwidth=150 * _GB,
    link_latency=5e-6,
    launch_latency=5e-6,
    memory_bytes=32 * _GB,
    compute_efficiency=0.75,
    memory_efficiency=0.8,
    link_efficiency=0.7,
)

# NVIDIA H100 SXM5 80GB, datasheet ("NVIDIA H100 Tensor Core GPU", 2023): BF16/FP16 989.4
# TFLOPS dense (1,979 with sparsity), FP8 1,979 dense, TF32 494.7, FP32 67, FP64 34 (67
# Tensor Core); HBM3 3.35 TB/s; NVLink 4 900 GB/s (450 GB/s each way); 700 W.
H100_SXM = DeviceSpec(
    name="h100-sxm",
    vendor="nvidia",
    peak_flops=(
        ("float16", 989.4 * _TFLOPS),
        ("bfloat16", 989.4 * _TFLOPS),
        ("float8_e4m3fn", 1978.9 * _TFLOPS),
        ("tensorfloat32", 494.7 * _TFLOPS),
        ("float32", 67 * _TFLOPS),
        ("float64", 67 * _TFLOPS),
        ("int8", 1978.9 * _TFLOPS),
    ),
    memory_bandwidth=3350 * _GB,
    link_bandwidth=450 * _GB,
    link_latency=4e-6,
    launch_latency=3e-6,
    memory_bytes=80 * _GB,
    compute_efficiency=0.7,
    memory_efficiency=0.8,
    link_efficiency=0.75,
)

# NVIDIA H200 SXM 141GB, datasheet ("NVIDIA H200 Tensor Core GPU", 2024): the H100's compute
# (989 TFLOPS BF16 dense, 1,979 FP8) with HBM3e 4.8 TB/s and NVLink 900 GB/s.
H200 = dataclasses.replace(
    H100_SXM, name="h200", memory_bandwidth=4800 * _GB, memory_bytes=141 * _GB
)

# This machine ("cpu-2c"): 2 vCPUs of an AMD EPYC Zen 4 (family 25, model 17: EPYC 9004) under
# KVM. Zen 4 has two 256-bit FMA pipes per core (AVX-512 runs double-pumped): 32 FP32
# FLOP/cycle; at the 9004 series' 3.7 GHz maximum boost, 2 x 3.7 GHz x 32 = 236.8 GFLOP/s,
# half that in FP64 (the TSC runs at 2.6 GHz; a single 1024^3 f32 GEMM reached ~210
# GFLOP/s here). XLA:CPU runs BF16/FP16 dots in FP32, so they get the FP32 peak. Memory
# bandwidth is a nominal share of a DDR5 socket for two cores (not a datasheet figure);
# collectives between virtual CPU devices are copies within one process.
# `calibration.calibrate()` refits the efficiencies and the launch latency from timings.
CPU = DeviceSpec(
    name="cpu",
    vendor="cpu",
    peak_flops=(
        ("float32", 236.8e9),
        ("bfloat16", 236.8e9),
        ("float16", 236.8e9),
        ("float64", 118.4e9),
    ),
    memory_bandwidth=40 * _GB,
    link_bandwidth=20 * _GB,
    link_latency=5e-6,
    launch_latency=5e-6,
    memory_bytes=24 * _GB,
    compute_efficiency=0.6,
    memory_efficiency=0.6,
    link_efficiency=0.8,
)

DEVICES: Mapping[str, DeviceSpec] = MappingProxyType(
    {d.name: d for d in (A100_PCIE, A100_SXM, V100_NVLINK, H100_SXM, H200, CPU)}
)


def device_for_kind(device_kind: str) -> str | None:
    """The :data:`DEVICES` table of a JAX ``device_kind`` (``"NVIDIA H100 80GB HBM3"`` ->
    ``"h100-sxm"``, ``"NVIDIA A100-PCIE-40GB"`` -> ``"a100-pcie"``, ``"cpu"`` -> ``"cpu"``);
    ``None`` for a device no table describes (an H100 PCIe, an L4, a TPU...)."""
    kind = device_kind.lower()
    if kind == "cpu":
        return "cpu"
    if "h200" in kind:
        return "h200"
    if "h100" in kind and "pcie" not in kind:
        return "h100-sxm"
    if "a100" in kind:
        return "a100-pcie" if "pcie" in kind else "a100-sxm"
    if "v100" in kind and "pcie" not in kind:
        return "v100-nvlink"
    return None


def get_device(name: str | DeviceSpec) -> DeviceSpec:
    """The spec called ``name`` in :data:`DEVICES` (a spec is returned as is)."""
    if isinstance(name, DeviceSpec):
        return name
    try:
        return DEVICES[name]
    except KeyError:
        raise ValueError(
            f"device={name!r}: unknown (known: {', '.join(sorted(DEVICES))})"
        ) from None
