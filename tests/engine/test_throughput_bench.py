"""``ligerjax bench throughput`` at toy size (the peers skipped): one line with the engine's
tokens/s and latency percentiles, here over a float16 KV cache (the C++ CPU kernel's 16-bit
pages, end to end through the engine)."""

from __future__ import annotations

import platform

from ligerjax.bench.throughput import host_cpu
from ligerjax.cli import main


def test_throughput_bench_prints_one_line(capsys):
    argv = [
        "bench", "throughput", "--num-requests", "3", "--min-prompt", "8", "--max-prompt", "24",
        "--min-output", "2", "--max-output", "5", "--max-num-seqs", "4",
        "--max-num-batched-tokens", "32", "--kv-cache-dtype", "float16",
        "--skip-transformers", "--skip-llama-cpp",
    ]  # fmt: skip
    assert main(argv) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("bench=")]
    assert len(lines) == 1
    fields = dict(kv.split("=", 1) for kv in lines[0].split())
    assert fields["bench"] == "throughput" and fields["reqs"] == "3"
    assert fields["kv_cache_dtype"] == "float16"
    assert "transformers_tok_s" not in fields and "llama_cpp_tok_s" not in fields
    assert float(fields["ligerjax_tok_s"]) > 0
    assert float(fields["ttft_p50"]) <= float(fields["ttft_p99"])
    output_tokens = int(fields["output_tokens"])
    assert 3 * 2 <= output_tokens <= 3 * 5
    assert fields["cpu"]


def test_host_cpu_names_vendor_family_model_and_avx512(tmp_path):
    zen4 = tmp_path / "zen4"
    zen4.write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
        "model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 fma avx512f avx512bw\n\n"
        "processor\t: 1\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
    )
    assert host_cpu(zen4) == "amd-f25m17-avx512"
    zen3 = tmp_path / "zen3"
    zen3.write_text(
        "vendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\nflags\t: avx2 fma\n"
    )
    assert host_cpu(zen3) == "amd-f25m1"
    assert host_cpu(tmp_path / "missing") == platform.machine()
