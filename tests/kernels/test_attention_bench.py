"""`ligerjax bench attention` runs and prints one fixed-format line per setting."""

from __future__ import annotations

import re

from ligerjax.cli import main


def test_cpu_bench_prints_one_line_per_length(capsys):
    assert main(["bench", "attention", "--seqs", "256,512", "--repeats", "1", "--skip-gpu"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("bench=")]
    assert [re.search(r"\bS=(\d+)", x).group(1) for x in lines] == ["256", "512"]
    for line in lines:
        assert line.startswith("bench=attention impl=fallback S=")
        fields = dict(kv.split("=", 1) for kv in line.split())
        for key in ("fallback_temp_mib", "dpa_temp_mib", "mem_ratio", "fallback_ms", "dpa_ms"):
            assert float(fields[key]) > 0, key
