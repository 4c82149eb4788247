"""Calibration: exact recovery of a known roofline, and a real (tiny) run on this CPU."""

from __future__ import annotations

import math

import pytest

from ligerjax.cost import DEVICES, CostModel
from ligerjax.cost.calibration import CalibrationCase, calibrate, default_cases

CASES = (
    CalibrationCase("launch", "launch"),
    CalibrationCase("gemm 64x64x64", "gemm", 64, 64, 64),
    CalibrationCase("gemm 128x256x64", "gemm", 128, 256, 64),
    CalibrationCase("add 2^16", "elementwise", size=1 << 16, op="add"),
    CalibrationCase("scale 2^17", "elementwise", size=1 << 17, op="scale"),
)


# Compute-bound GEMMs and memory-bound elementwise ops under the CPU table, for fitting
# synthetic timings (nothing is timed).
SYNTHETIC = (
    CalibrationCase("launch", "launch"),
    CalibrationCase("gemm 256x256x256", "gemm", 256, 256, 256),
    CalibrationCase("gemm 512x256x128", "gemm", 512, 256, 128),
    CalibrationCase("add 2^16", "elementwise", size=1 << 16, op="add"),
    CalibrationCase("scale 2^17", "elementwise", size=1 << 17, op="scale"),
)


def test_fit_recovers_efficiencies_of_synthetic_timings_exactly():
    cpu = DEVICES["cpu"]
    truth = CostModel(
        cpu.replace(launch_latency=2e-5, compute_efficiency=0.5, memory_efficiency=0.25)
    )
    times = [
        truth.op_duration(c.flops(), c.bytes(4), "float32") if c.kind != "launch" else 2e-5
        for c in SYNTHETIC
    ]
    report = calibrate("cpu", cases=SYNTHETIC, measured=times)
    assert report.device.launch_latency == pytest.approx(2e-5)
    assert report.device.compute_efficiency == pytest.approx(0.5)
    assert report.device.memory_efficiency == pytest.approx(0.25)
    # the launch probe (one element) still moves 12 bytes: a hundredth of a percent
    assert report.mean_abs_pct_error == pytest.approx(0.0, abs=0.01)
    assert [r.name for r in report.rows] == [c.name for c in SYNTHETIC]


def test_a_peak_below_the_measured_rate_is_raised_not_exceeded():
    fast = [1e-6, 1e-9, 1e-9, 1e-3, 1e-3]  # GEMMs far faster than the CPU table's peak
    report = calibrate("cpu", cases=SYNTHETIC, measured=fast)
    assert report.device.compute_efficiency == 1.0
    assert report.device.peak("float32") > DEVICES["cpu"].peak("float32")


def test_calibration_times_real_ops_and_reports_an_error_figure():
    report = calibrate("cpu", cases=CASES, repeats=2)
    assert len(report.rows) == len(CASES)
    assert all(r.measured_s > 0 and r.predicted_s > 0 for r in report.rows)
    assert math.isfinite(report.mean_abs_pct_error) and report.mean_abs_pct_error >= 0
    assert "mean_abs_pct_error" in report.format()


def test_default_cases_cover_gemms_and_elementwise_ops():
    kinds = [c.kind for c in default_cases()]
    assert kinds.count("launch") == 1 and kinds.count("gemm") >= 4
    assert kinds.count("elementwise") >= 3


def test_calibration_rejects_bad_input():
    with pytest.raises(ValueError, match="need at least one 'launch'"):
        calibrate("cpu", cases=CASES[1:], measured=[1.0] * 4)
    with pytest.raises(ValueError, match=r"measured=-1\.0"):
        calibrate("cpu", cases=CASES, measured=[1.0, -1.0, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"CalibrationCase\.m=0"):
        CalibrationCase("bad", "gemm", 0, 1, 1)
    with pytest.raises(ValueError, match="device='gpu9'"):
        calibrate("gpu9", cases=CASES, measured=[1.0] * 5)
