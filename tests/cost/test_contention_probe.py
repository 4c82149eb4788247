"""The contention probe: the fit, the programs it times, a real run, the GPU schedule."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from ligerjax.cli import main
from ligerjax.compiler import deviceless
from ligerjax.cost import Contention, CostModel
from ligerjax.cost.contention_probe import (
    ContentionCase,
    ContentionReport,
    WindowShape,
    fit_factor,
    fit_pair,
    measure_contention,
    window_program,
    window_structs,
    window_time,
)
from ligerjax.schedule import hlo_schedule, throughput_bound

SMALL = WindowShape(tokens=8, width=16, rows=4, windows=3)


def _mesh(n: int) -> jax.sharding.Mesh:
    return deviceless.cpu_mesh(n, ("tp",))


@pytest.mark.parametrize(
    ("compute_s", "comm_s", "factor"),
    [(3.0, 2.0, 1.2), (2.0, 3.0, 1.2), (1.0, 1.0, 1.25), (2.0, 2.0, 2.0), (5.0, 1.0, 1.0)],
)
def test_fit_factor_recovers_the_slowdown_of_the_model(compute_s, comm_s, factor):
    # The model: the window takes max + (f - 1) * min.
    both_s = max(compute_s, comm_s) + (factor - 1) * min(compute_s, comm_s)
    assert fit_factor(compute_s, comm_s, both_s) == pytest.approx(factor, rel=1e-12)


def test_a_window_faster_than_the_longer_program_reads_as_free_overlap():
    assert fit_factor(3.0, 2.0, 2.9) == 1.0


@pytest.mark.parametrize("bad", ["compute_s", "comm_s", "both_s"])
def test_fit_factor_names_a_bad_timing(bad):
    times = {"compute_s": 1.0, "comm_s": 1.0, "both_s": 1.5, bad: 0.0}
    with pytest.raises(ValueError, match=bad):
        fit_factor(**times)


def test_the_report_factor_is_the_median_case():
    cases = [ContentionCase(r, 1, 1.0, 1.0, 1.0 + f) for r, f in ((0.5, 0.1), (1, 0.3), (2, 0.2))]
    assert [c.factor for c in cases] == pytest.approx([1.1, 1.3, 1.2])
    report = ContentionReport("cpu", 2, SMALL, tuple(cases), both_hlo="")
    assert report.factor == pytest.approx(1.2)
    assert report.contention == Contention(compute=report.factor, comm=report.factor)


@pytest.mark.parametrize(
    ("compute_s", "comm_s", "contention"),
    [
        (3.0, 2.0, Contention(1.2, 1.05)),
        (1.0, 2.0, Contention(1.2, 1.05)),
        (2.0, 2.0, Contention(1.05, 1.4)),
        (2.0, 1.0, Contention(2.0, 2.0)),
        (1.0, 1.0, Contention(1.0, 1.0)),
    ],
)
def test_window_time_is_the_simulators_two_stream_model(compute_s, comm_s, contention):
    from ligerjax.schedule import COMM, COMPUTE, FunctionVector, Op, Schedule, simulate

    comm = FunctionVector((Op("all_reduce", COMM, duration_s=comm_s),), name="primary")
    compute = FunctionVector((Op("gemm", COMPUTE, duration_s=compute_s),), name="secondary")
    schedule = Schedule((comm, compute), ((0, 0), (1, 0)))
    makespan = simulate(schedule, contention).makespan_s
    assert window_time(compute_s, comm_s, contention) == pytest.approx(makespan, rel=1e-12)


@pytest.mark.parametrize(
    "truth",
    [Contention(1.2, 1.05), Contention(1.05, 1.3), Contention(1.25, 1.25), Contention(2.0, 2.0)],
)
def test_fit_pair_recovers_separate_factors_from_cases_on_both_sides(truth):
    cases = [
        ContentionCase(b, 1, b * 1e-3, 1e-3, window_time(b * 1e-3, 1e-3, truth))
        for b in (0.5, 1.0, 2.0)
    ]
    pair = fit_pair(cases)
    assert (pair.compute, pair.comm) == pytest.approx((truth.compute, truth.comm), abs=1e-9)


@pytest.mark.parametrize("field", ["tokens", "width", "rows", "windows"])
def test_window_shape_names_a_bad_size(field):
    with pytest.raises(ValueError, match=f"WindowShape.{field}"):
        WindowShape(**{"tokens": 1, "width": 1, "rows": 1, field: 0})


def test_window_shape_counts_the_all_reduce_bytes():
    assert WindowShape(tokens=32, width=4096, rows=1, dtype="bf16").all_reduce_bytes == 256 * 1024


@pytest.mark.multidevice
@pytest.mark.parametrize("n", [2, 4])
def test_the_programs_reduce_and_multiply_what_they_claim(n):
    mesh = _mesh(n)
    rng = np.random.default_rng(n)
    a = rng.standard_normal((n * SMALL.tokens, SMALL.width)).astype(np.float32)  # [n*T, E]
    y = rng.standard_normal((n * SMALL.rows, SMALL.width)).astype(np.float32)  # [n*M, E]
    w = rng.standard_normal((n * SMALL.width, SMALL.width)).astype(np.float32) / 4  # [n*E, E]
    a_dte, y_dme, w_dee = (x.reshape(n, -1, SMALL.width) for x in (a, y, w))
    reduced = a_dte.sum(0) * float(n) ** (SMALL.windows - 1)  # every window reduces again
    multiplied = y_dme
    for _ in range(SMALL.windows * 2):
        multiplied = multiplied @ w_dee
    structs = window_structs(SMALL, mesh)
    args = [jax.device_put(x, s.sharding) for x, s in zip((a, y, w), structs, strict=True)]
    for kind in ("comm", "compute", "both"):
        out_a, out_y = jax.jit(window_program(kind, SMALL, mesh, gemms=2))(*args)
        want_a = np.broadcast_to(reduced, a_dte.shape) if kind != "compute" else a_dte
        want_y = multiplied if kind != "comm" else y_dme
        np.testing.assert_allclose(np.asarray(out_a).reshape(a_dte.shape), want_a, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(out_y).reshape(y_dme.shape), want_y, rtol=1e-4)


def test_window_program_names_bad_arguments():
    mesh = _mesh(2)
    with pytest.raises(ValueError, match="kind='gather'"):
        window_program("gather", SMALL, mesh)
    with pytest.raises(ValueError, match="axis='pp'"):
        window_program("both", SMALL, mesh, axis="pp")
    with pytest.raises(ValueError, match="gemms=0"):
        window_program("both", SMALL, mesh, gemms=0)


def test_measure_contention_needs_two_devices_and_positive_ratios():
    with pytest.raises(ValueError, match="at least 2 devices"):
        measure_contention(_mesh(1), shape=SMALL)
    with pytest.raises(ValueError, match="ratios"):
        measure_contention(_mesh(2), shape=SMALL, ratios=(1.0, -1.0))


@pytest.mark.multidevice
def test_a_real_probe_on_virtual_cpu_devices_times_every_case():
    report = measure_contention(_mesh(2), shape=SMALL, ratios=(0.5, 2.0), repeats=1)
    assert [c.ratio for c in report.cases] == [0.5, 2.0]
    for case in report.cases:
        assert case.gemms >= 1
        assert min(case.compute_s, case.comm_s, case.both_s) > 0
        assert case.factor >= 1.0
    assert report.contention.compute == report.contention.comm == report.factor
    assert report.num_devices == 2 and report.device_kind == "cpu"
    assert "contention=" in report.format()
    # CPU collectives are synchronous: the schedule read back has nothing inside them.
    coverage = hlo_schedule.overlap_coverage(report.both_hlo, CostModel.for_device("cpu"))
    assert len(coverage.records) == SMALL.windows
    assert all(not r.is_async for r in coverage.records)


@pytest.mark.deviceless
@pytest.mark.parametrize("target", ["h100", "a100"])
def test_on_gpus_every_window_all_reduce_encloses_its_gemms(target):
    shape = WindowShape(tokens=32, width=4096, rows=1024, dtype="bfloat16", windows=4)
    mesh = deviceless.gpu_mesh(target, 4)
    structs = window_structs(shape, mesh)
    cost = CostModel.for_device(deviceless.get_target(target).cost_device)
    primary = hlo_schedule.is_primary_scope("primary")
    for gemms in (1, 3):
        program = window_program("both", shape, mesh, gemms=gemms)
        text = deviceless.compile_text(program, *structs, target=target).text
        records = hlo_schedule.overlap_coverage(text, cost, is_primary=primary).selected
        assert len(records) == shape.windows
        for record in records:
            assert record.kind == "all_reduce" and record.is_async, record
            assert len(record.compute_names) == gemms, record


@pytest.mark.multidevice
def test_the_contention_bench_prints_one_result_line(capsys):
    small = ["--tokens", "8", "--width", "16", "--rows", "4", "--windows", "2"]
    assert main(["bench", "contention", "--devices", "2", "--repeats", "1", *small]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("bench=contention device=cpu devices=2 all_reduce_kib=0 gemm=4x16x16")
    fields = dict(kv.split("=", 1) for kv in line.split())
    factors = [float(f) for f in fields["factors"].split("/")]
    assert len(factors) == 3 and float(fields["contention"]) == sorted(factors)[1]
    assert fields["async_all_reduces"] == "0/2"  # CPU collectives are synchronous
    fc, fm = (float(f) for f in fields["contention_pair"].split("/"))
    assert 1.0 <= fc <= 3.0 and 1.0 <= fm <= 3.0
    f = float(fields["contention"])  # rounded to 0.001: the bound of the true f lies between
    if f > 1.001:
        low, high = (throughput_bound(Contention(g, g), 0.05) for g in (f + 5e-4, f - 5e-4))
        assert low - 5e-4 <= float(fields["throughput_bound"]) <= high + 5e-4


@pytest.mark.gpu
def test_on_real_gpus_the_windows_overlap():
    gpus = jax.devices("gpu")
    if len(gpus) < 2:
        pytest.skip(f"needs 2 GPUs to all-reduce between (this machine has {len(gpus)})")
    mesh = jax.make_mesh((len(gpus),), ("tp",), devices=gpus)
    report = measure_contention(mesh, repeats=3)
    records = hlo_schedule.overlap_coverage(report.both_hlo, CostModel.for_device("h100-sxm"))
    assert all(r.is_async and r.compute_names for r in records.records)
    # Overlap happened: every case ran faster than its two programs back to back.
    assert all(c.both_s < c.compute_s + c.comm_s for c in report.cases)
