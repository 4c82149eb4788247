"""`ligerjax bench attention` runs and prints one fixed-format line per setting."""

from __future__ import annotations

import argparse
import re

import pytest

from ligerjax.bench import attention
from ligerjax.cli import main
from ligerjax.kernels.native_attention import native_available


def test_cpu_bench_prints_one_line_per_length(capsys):
    assert main(["bench", "attention", "--seqs", "256,512", "--repeats", "1", "--skip-gpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    lines = [x for x in out if x.startswith("bench=attention impl=fallback")]
    assert [re.search(r"\bS=(\d+)", x).group(1) for x in lines] == ["256", "512"]
    for line in lines:
        assert line.startswith("bench=attention impl=fallback S=")
        fields = dict(kv.split("=", 1) for kv in line.split())
        for key in ("fallback_temp_mib", "dpa_temp_mib", "mem_ratio", "fallback_ms", "dpa_ms"):
            assert float(fields[key]) > 0, key


def _bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    attention.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.skipif(not native_available(), reason="the C++ CPU kernel is not built here")
def test_cpu_paged_lines_time_the_cpp_kernel_against_the_fallback():
    args = _bench_args("--repeats", "1")
    lines = [
        *attention._cpu_paged_lines("decode", 4, args),
        *attention._cpu_paged_lines("mixed", 2, args, "bfloat16"),
    ]
    fields = [dict(kv.split("=", 1) for kv in x.split()) for x in lines]
    assert [(f["impl"], f["step"], f["T"], f["B"], f["dtype"]) for f in fields] == [
        ("native-paged", "decode", "4", "4", "float32"),
        ("native-paged", "mixed", "482", "3", "bfloat16"),
    ]
    for f in fields:
        assert float(f["native_ms"]) > 0 and float(f["fallback_ms"]) > 0
        assert float(f["err_vs_f32"]) < 1e-5  # the reference reads the same pages


def test_gpu_settings_print_their_lines_on_any_backend():
    """The GPU lines at toy sizes (Pallas interpreted here; cuDNN unavailable reads nan)."""
    args = _bench_args(
        "--repeats", "1", "--gpu-tokens", "32", "--flash-tiles", "32x32x4x3",
        "--paged-tiles", "2x4x3x1",
    )  # fmt: skip
    lines = [
        *attention._gpu_flash_lines(32, 64, args),
        *attention._gpu_flash_tune_lines(32, 64, args),
        *attention._gpu_paged_lines(2, 64, args),
        *attention._gpu_paged_tune_lines(2, 64, args),
    ]
    assert [x.split()[:2] for x in lines] == [
        ["bench=attention", "impl=pallas"],
        ["bench=attention-tune", "impl=pallas"],
        ["bench=attention", "impl=paged"],
        ["bench=attention-tune", "impl=paged"],
    ]
    fields = [dict(kv.split("=", 1) for kv in x.split()) for x in lines]
    assert float(fields[0]["vs_xla"]) > 0  # both sides ran (TFLOP/s round to 0.0 here)
    assert fields[1]["block_q"] == "32" and fields[1]["num_stages"] == "3"
    for paged in fields[2:]:
        assert float(paged["us"]) > 0 and float(paged["err_vs_f32"]) < 2e-2  # bf16 pages
    assert fields[3]["pages_per_block"] == "2"


def test_malformed_tile_list_is_refused():
    with pytest.raises(ValueError, match="64x64x4"):
        attention._tiles("64x64x4", attention.FLASH_TUNE_GRID)
    assert attention._tiles("", attention.FLASH_TUNE_GRID) == attention.FLASH_TUNE_GRID
