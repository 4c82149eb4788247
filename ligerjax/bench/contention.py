"""Measure the contention factor of this machine's devices (Liger's offline profiling).

Times windows of an all-reduce alone, GEMMs alone, and the all-reduce with the GEMMs inside
(shaped as the emit pass shapes a window of the interleaved step) on a mesh of this
machine's devices, at several compute : all-reduce balances, and fits the slowdown ``f``
that the planner and the simulator assume while the two overlap
(:mod:`ligerjax.cost.contention_probe`): one factor for both kinds, and a pair (compute,
all-reduce) fitted across the cases. The peer is the same windows run one program after the
other. The result line also gives the throughput bound an interleaved step has at that
``f`` and the latency budget (:func:`ligerjax.schedule.throughput_bound`), and whether the
compiled program really put the GEMMs inside asynchronous all-reduces (CPU collectives are
synchronous: there ``f`` is about 2, no overlap). On GPUs, NCCL's channels and threads can
be capped first (``--nccl-channels``, ``--nccl-threads``), as Liger does to leave SMs to the
GEMMs. Feed the factors to ``ligerjax bench interleave --contention F`` (or ``F_COMPUTE
F_COMM``).
"""

from __future__ import annotations

import argparse

from ligerjax.bench import rerun_with_cpu_devices
from ligerjax.cost.contention_probe import WindowShape, default_shape, measure_contention
from ligerjax.cost.cost_model import CostModel, apply_nccl_env, nccl_env
from ligerjax.schedule import throughput_bound


def add_arguments(parser: argparse.ArgumentParser) -> None:
    gpu, cpu = default_shape("gpu"), default_shape("cpu")

    def defaults(field: str) -> str:
        return f"default: GPU {getattr(gpu, field)}, CPU {getattr(cpu, field)}"

    parser.add_argument("--devices", type=int, default=None, help="mesh size (default: all)")
    parser.add_argument(
        "--tokens", type=int, default=None, help=f"rows of the all-reduce ({defaults('tokens')})"
    )
    parser.add_argument("--width", type=int, default=None, help=f"width E ({defaults('width')})")
    parser.add_argument(
        "--rows", type=int, default=None, help=f"rows M of each GEMM ({defaults('rows')})"
    )
    parser.add_argument("--dtype", default=None, help=defaults("dtype"))
    parser.add_argument("--windows", type=int, default=8, help="windows per program")
    parser.add_argument(
        "--ratios",
        type=float,
        nargs="+",
        default=[0.5, 1.0, 2.0],
        help="compute : all-reduce balances to time, one case each",
    )
    parser.add_argument("--repeats", type=int, default=5, help="rounds; the best counts")
    parser.add_argument(
        "--max-inflation",
        type=float,
        default=0.05,
        help="primary latency budget for the throughput bound printed",
    )
    parser.add_argument("--nccl-channels", type=int, default=None, help="NCCL_MAX_NCHANNELS (GPUs)")
    parser.add_argument("--nccl-threads", type=int, default=None, help="NCCL_NTHREADS (GPUs)")
    parser.add_argument("--table", action="store_true", help="print the cases' table too")


def _shape(args: argparse.Namespace, platform: str) -> WindowShape:
    base = default_shape(platform)
    return WindowShape(
        tokens=args.tokens or base.tokens,
        width=args.width or base.width,
        rows=args.rows or base.rows,
        dtype=args.dtype or base.dtype,
        windows=args.windows,
    )


def _overlapped(hlo: str) -> tuple[int, int]:
    """(async all-reduces with compute inside, all-reduces) in the compiled ``both``."""
    from ligerjax.schedule import hlo_schedule

    records = hlo_schedule.overlap_coverage(hlo, CostModel.for_device("cpu")).records
    inside = sum(1 for r in records if r.is_async and r.compute_names)
    return inside, len(records)


def run(args: argparse.Namespace) -> int:
    if (args.nccl_channels is None) != (args.nccl_threads is None):
        raise SystemExit("--nccl-channels and --nccl-threads go together")
    if args.nccl_channels is not None:
        apply_nccl_env(nccl_env(args.nccl_channels, args.nccl_threads))
    import jax

    devices = jax.devices()
    if len(devices) < 2 and devices[0].platform == "cpu":
        return rerun_with_cpu_devices("contention")
    n = args.devices or len(devices)
    if not 2 <= n <= len(devices):
        raise SystemExit(f"--devices={n}: between 2 and the {len(devices)} devices here")
    mesh = jax.make_mesh((n,), ("tp",), devices=devices[:n])
    shape = _shape(args, devices[0].platform)
    report = measure_contention(mesh, shape=shape, ratios=args.ratios, repeats=args.repeats)
    if args.table:
        print(report.format(), flush=True)
    inside, total = _overlapped(report.both_hlo)
    bound = throughput_bound(report.contention, args.max_inflation)
    pair = report.pair
    sequential = sum(c.compute_s + c.comm_s for c in report.cases)
    together = sum(c.both_s for c in report.cases)
    fields = {
        "bench": "contention",
        "device": report.device_kind.replace(" ", "-"),
        "devices": n,
        "all_reduce_kib": f"{shape.all_reduce_bytes / 1024:.0f}",
        "gemm": f"{shape.rows}x{shape.width}x{shape.width}",
        "dtype": shape.dtype,
        "contention": f"{report.factor:.3f}",
        "factors": "/".join(f"{c.factor:.3f}" for c in report.cases),
        "balances": "/".join(f"{c.compute_s / c.comm_s:.2f}" for c in report.cases),
        "overlapped_ms": f"{together * 1e3:.3f}",
        "sequential_ms": f"{sequential * 1e3:.3f}",
        "async_all_reduces": f"{inside}/{total}",
        "max_inflation": args.max_inflation,
        "throughput_bound": f"{bound:.3f}",
        "contention_pair": f"{pair.compute:.3f}/{pair.comm:.3f}",
        "throughput_bound_pair": f"{throughput_bound(pair, args.max_inflation):.3f}",
        "nccl": "default"
        if args.nccl_channels is None
        else f"{args.nccl_channels}x{args.nccl_threads}",
    }
    print(" ".join(f"{k}={v}" for k, v in fields.items()), flush=True)
    return 0
