"""The liger-headline benchmark runs end to end on a small stream and prints its line."""

from __future__ import annotations

from ligerjax.cli import main


def test_liger_headline_prints_one_result_line(capsys, tmp_path):
    rc = main(
        [
            "bench",
            "liger-headline",
            "--layers",
            "4",
            "--reqs",
            "16",
            "--warmup",
            "2",
            "--trace-dir",
            str(tmp_path),
        ]
    )
    assert rc == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("bench=liger-headline device=a100-pcie tp=4 hidden=12288")
    fields = dict(kv.split("=", 1) for kv in line.split())
    assert fields["paper_throughput_ratio"] == "1.34"
    assert fields["paper_latency_vs_pp"] == "-0.36"
    assert float(fields["throughput_ratio"]) > 1.0  # interleaving adds throughput
    assert float(fields["latency_vs_pp"]) < 0.0  # and beats the pipeline's latency
    assert (tmp_path / "liger_headline.png").exists()
    assert (tmp_path / "liger_headline.trace.json").exists()
