"""``ligerjax bench memory``: paged KV waste vs contiguous reservation on a length trace."""

from __future__ import annotations

import json
import re

import numpy as np

from ligerjax.bench import memory
from ligerjax.cli import main


def test_memory_bench_prints_one_line_and_meets_the_waste_goal(capsys):
    assert main(["bench", "memory", "--reqs", "300", "--budget-tokens", "16384"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("bench=memory trace=synthetic-lognormal reqs=300 block_size=16 ")
    fields = dict(kv.split("=", 1) for kv in line.split())
    percent = lambda key: float(re.fullmatch(r"([\d.]+)%", fields[key]).group(1))  # noqa: E731
    assert percent("paged_waste") < 4.0
    assert percent("internal_frag") == percent("paged_waste")
    assert percent("reservation_waste") > 60.0
    assert percent("oracle_waste") < percent("reservation_waste")
    assert int(fields["reservation_max_concurrent"]) == 16384 // 2048
    assert int(fields["paged_max_concurrent"]) > 4 * int(fields["reservation_max_concurrent"])


def test_synthetic_trace_is_seeded_fits_the_context_and_has_sharegpt_means():
    lengths = memory.synthetic_trace(20000, 2048, seed=3)
    assert lengths == memory.synthetic_trace(20000, 2048, seed=3)
    prompts, outputs = np.array(lengths).T
    assert prompts.min() >= 1 and outputs.min() >= 1 and (prompts + outputs).max() <= 2048
    assert abs(prompts.mean() - 202) < 12 and abs(outputs.mean() - 179) < 10


def test_a_truncated_sharegpt_file_yields_its_intact_conversations(tmp_path):
    convs = [
        {"id": str(i), "conversations": [{"from": "human", "value": f"q{i}"}]} for i in range(3)
    ]
    text = json.dumps(convs, indent=1)
    path = tmp_path / "sharegpt.json"
    path.write_text(text[: text.index('"q2"') + 2])  # cut inside the third entry
    assert [c["id"] for c in memory._sharegpt_conversations(path)] == ["0", "1"]
