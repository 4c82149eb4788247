"""Cost model: device tables, roofline op durations, ring collectives, contention."""

from __future__ import annotations

from ligerjax.cost.calibration import CalibrationReport, calibrate
from ligerjax.cost.cost_model import (
    COLLECTIVES,
    Contention,
    CostModel,
    apply_nccl_env,
    nccl_env,
    nvidia_gpu_present,
)
from ligerjax.cost.device_spec import DEVICES, DeviceSpec, device_for_kind, dtype_name, get_device

__all__ = [
    "COLLECTIVES",
    "DEVICES",
    "CalibrationReport",
    "Contention",
    "CostModel",
    "DeviceSpec",
    "apply_nccl_env",
    "calibrate",
    "device_for_kind",
    "dtype_name",
    "get_device",
    "nccl_env",
    "nvidia_gpu_present",
]
