"""The interleave benchmark plans, compiles (deviceless) and prints the 7B-like line."""

from __future__ import annotations

import pytest

from ligerjax.cli import main

pytestmark = [pytest.mark.deviceless, pytest.mark.slow]


def test_interleave_bench_prints_one_step_and_sustained_figures(capsys):
    assert main(["bench", "interleave", "--models", "7b", "--no-cpu-compile"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("bench=interleave model=7b-like target=a100-pcie tp=4")
    fields = dict(kv.split("=", 1) for kv in line.split())
    one_step, sustained = float(fields["throughput_ratio"]), float(fields["sustained_ratio"])
    assert float(fields["primary_inflation"]) <= 0.05 + 1e-3
    assert 1.0 < one_step <= float(fields["throughput_bound"]) + 1e-3
    # The whole prefill meets all-reduces no window takes whole: less than the first step.
    assert 1.0 <= sustained < one_step
    assert int(fields["sustained_steps"]) > 1
    assert float(fields["coverage"]) > float(fields["coverage_no_barriers"])
