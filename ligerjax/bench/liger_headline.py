"""Liger's headline setting in the simulator: 4 x A100 PCIe, TP=4, GLM-130B-sized layers.

Three ways to serve the same request stream (Liger's artifact: batches of 2 sequences of
16..115 tokens, GLM-130B's hidden 12288) are planned and run through the timeline simulator
with the cost model's A100-PCIe durations:

* TP: plain tensor parallelism, requests back to back (FCFS);
* Liger: the same TP=4 vectors interleaved by :func:`~ligerjax.schedule.plan_liger` (up to
  6 requests in flight, decomposition factor 8, contention inflation on overlapped time);
* PP: a 4-stage pipeline, each device holding a quarter of the layers at full width.

Throughput is measured with every request queued at t=0 (saturation), over the requests
after the warm-up: ``throughput_ratio`` = Liger / TP (the paper: 1.34x). Latency (arrival
to completion, queueing included) is measured at a common arrival rate both Liger and PP
sustain, ``--load`` times the lower of their saturated throughputs, with arrivals at a fixed
interval as in the artifact: ``latency_vs_pp`` = Liger's mean / PP's mean - 1 (the paper:
-0.36). TP's mean latency at that rate is reported too (it may exceed TP's capacity), and
``latency_vs_tp`` compares Liger with TP at ``--load`` times TP's own throughput (the paper:
Liger's latency is lower than TP's).

The planner inflates overlapped durations by ``1/--efficiency`` (Liger's prototype: 0.8);
the simulated hardware slows overlapped ops by ``--sim-compute``/``--sim-comm`` (default:
the planner's factors). ``docs/BENCHMARKS.md`` gives the assumptions and a sensitivity table.
"""

from __future__ import annotations

import argparse
import logging
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ligerjax.cost.cost_model import Contention, CostModel
from ligerjax.cost.device_spec import DEVICES, get_device
from ligerjax.schedule.function_vector import COMM, COMPUTE, FunctionVector
from ligerjax.schedule.interleave import InterleaveConfig, LigerConfig, plan_liger
from ligerjax.schedule.liger_workloads import (
    GLM_130B,
    TransformerConfig,
    arrival_times,
    liger_requests,
    vectors_for,
)
from ligerjax.schedule.timeline import Schedule, Timeline, simulate

log = logging.getLogger(__name__)

PAPER_THROUGHPUT_RATIO = 1.34
PAPER_LATENCY_VS_PP = -0.36


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="a100-pcie", choices=sorted(DEVICES))
    parser.add_argument("--tp", type=int, default=4, help="tensor-parallel (and pipeline) degree")
    parser.add_argument("--layers", type=int, default=GLM_130B.num_layers)
    parser.add_argument("--reqs", type=int, default=150, help="requests (the artifact: 150)")
    parser.add_argument("--warmup", type=int, default=20, help="first requests left out")
    parser.add_argument("--batch", type=int, default=2, help="sequences per request")
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--depth", type=int, default=6, help="Liger: requests in flight")
    parser.add_argument("--factor", type=int, default=8, help="Liger: decomposition factor")
    parser.add_argument(
        "--efficiency",
        type=float,
        default=0.8,
        help="the planner's flat overlap efficiency (Liger's 0.8): it inflates by 1/eff",
    )
    parser.add_argument(
        "--sim-compute",
        type=float,
        help="simulated slowdown of compute overlapped with comm (default: the planner's)",
    )
    parser.add_argument(
        "--sim-comm",
        type=float,
        help="simulated slowdown of comm overlapped with compute (default: the planner's)",
    )
    parser.add_argument(
        "--link-efficiency",
        type=float,
        help="override the device table's fraction of link bandwidth collectives reach",
    )
    parser.add_argument("--split-comm", action="store_true", help="Liger may cut all-reduces")
    parser.add_argument(
        "--skip-blocked",
        action="store_true",
        help="Liger: a secondary op that cannot fit passes the window on to the next secondary",
    )
    parser.add_argument("--load", type=float, default=0.9, help="arrival rate / capacity")
    parser.add_argument("--arrivals", choices=("periodic", "poisson"), default="periodic")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--trace-dir", type=Path, help="write a Chrome trace and a PNG of Liger's timeline"
    )


@dataclass(frozen=True)
class Measured:
    """Throughput (requests/s) and mean latency (s) over the requests after warm-up."""

    req_s: float
    mean_latency_s: float


def measure(timeline: Timeline, warmup: int) -> Measured:
    """Throughput between the warm-up's last completion and the last completion, and the
    mean arrival-to-completion latency of the requests after the warm-up."""
    done = sorted(timeline.completion_s)
    kept = len(done) - warmup
    span = done[-1] - (done[warmup - 1] if warmup > 0 else 0.0)
    req_s = kept / span if span > 0 else float("inf")
    latency = statistics.fmean(timeline.latency_s[warmup:])
    return Measured(req_s, latency)


def _validate(args: argparse.Namespace) -> None:
    for name in ("tp", "layers", "reqs", "batch", "depth", "factor"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}={getattr(args, name)}: must be >= 1")
    if not 0 <= args.warmup < args.reqs:
        raise ValueError(f"--warmup={args.warmup}: must be in [0, --reqs)")
    if not args.load > 0:
        raise ValueError(f"--load={args.load}: must be > 0")


@dataclass(frozen=True)
class HeadlineResult:
    """Saturated throughputs, and mean latencies at the common rate and at TP's rate."""

    tp: Measured  # saturated
    liger: Measured
    pp: Measured
    rate_req_s: float  # load x min(Liger, PP) throughput
    liger_at_rate: Measured
    pp_at_rate: Measured
    tp_at_rate: Measured
    tp_rate_req_s: float  # load x TP throughput
    liger_at_tp_rate: Measured
    tp_at_tp_rate: Measured
    liger_timeline: Timeline  # saturated, for the trace

    @property
    def throughput_ratio(self) -> float:
        """Liger's saturated throughput over plain TP's (the paper: 1.34)."""
        return self.liger.req_s / self.tp.req_s

    @property
    def latency_vs_pp(self) -> float:
        """Liger's mean latency over PP's at the common rate, minus 1 (the paper: -0.36)."""
        return self.liger_at_rate.mean_latency_s / self.pp_at_rate.mean_latency_s - 1

    @property
    def latency_vs_tp(self) -> float:
        """Liger's mean latency over TP's at a rate TP sustains, minus 1."""
        return self.liger_at_tp_rate.mean_latency_s / self.tp_at_tp_rate.mean_latency_s - 1


def simulate_headline(
    tp_vecs: Sequence[FunctionVector],
    pp_vecs: Sequence[FunctionVector],
    cost: CostModel,
    hardware: Contention,
    config: LigerConfig,
    *,
    warmup: int,
    load: float,
    arrivals: str = "periodic",
    seed: int = 0,
) -> HeadlineResult:
    """Serve the requests (``tp_vecs[i]`` and ``pp_vecs[i]`` are request i) with plain TP,
    Liger and PP: saturated, then at ``load`` x min(Liger, PP) throughput, then Liger and
    TP at ``load`` x TP's throughput. ``cost`` plans Liger; ``hardware`` is the simulated
    slowdown of overlapped ops."""
    n = len(tp_vecs)

    def tp_run(release: Sequence[float] | None) -> Timeline:
        return simulate(Schedule.sequential(tp_vecs, release), hardware)

    def pp_run(release: Sequence[float] | None) -> Timeline:
        return simulate(Schedule.sequential(pp_vecs, release), hardware)

    def liger_run(release: Sequence[float] | None) -> Timeline:
        return simulate(plan_liger(tp_vecs, release, cost=cost, config=config), hardware)

    tp = measure(tp_run(None), warmup)
    liger_tl = liger_run(None)
    liger = measure(liger_tl, warmup)
    pp = measure(pp_run(None), warmup)
    rate = load * min(liger.req_s, pp.req_s)
    release = arrival_times(n, rate, pattern=arrivals, seed=seed)
    tp_rate = load * tp.req_s
    tp_release = arrival_times(n, tp_rate, pattern=arrivals, seed=seed)
    return HeadlineResult(
        tp=tp,
        liger=liger,
        pp=pp,
        rate_req_s=rate,
        liger_at_rate=measure(liger_run(release), warmup),
        pp_at_rate=measure(pp_run(release), warmup),
        tp_at_rate=measure(tp_run(release), warmup),
        tp_rate_req_s=tp_rate,
        liger_at_tp_rate=measure(liger_run(tp_release), warmup),
        tp_at_tp_rate=measure(tp_run(tp_release), warmup),
        liger_timeline=liger_tl,
    )


def run(args: argparse.Namespace) -> int:
    _validate(args)
    device = get_device(args.device)
    if args.link_efficiency is not None:
        device = device.replace(link_efficiency=args.link_efficiency)
    # The planner inflates overlapped ops by Liger's flat efficiency; the simulated
    # hardware slows them by --sim-compute / --sim-comm (default: the same factors).
    cost = CostModel(device, Contention.flat(args.efficiency))
    hardware = Contention(
        compute=cost.contention.compute if args.sim_compute is None else args.sim_compute,
        comm=cost.contention.comm if args.sim_comm is None else args.sim_comm,
    )
    cfg = TransformerConfig(num_layers=args.layers)
    requests = liger_requests(
        args.reqs, batch=args.batch, max_seq_len=args.max_seq_len, seed=args.seed
    )
    config = LigerConfig(
        depth=args.depth,
        interleave=InterleaveConfig(
            factor=args.factor,
            split_kinds=(COMPUTE, COMM) if args.split_comm else (COMPUTE,),
            skip_blocked=args.skip_blocked,
        ),
    )
    tp_vecs = vectors_for(requests, "tp", cfg, cost, degree=args.tp)
    pp_vecs = vectors_for(requests, "pp", cfg, cost, degree=args.tp)
    res = simulate_headline(
        tp_vecs,
        pp_vecs,
        cost,
        hardware,
        config,
        warmup=args.warmup,
        load=args.load,
        arrivals=args.arrivals,
        seed=args.seed,
    )
    tp_alone = statistics.fmean(v.duration_s for v in tp_vecs)
    pp_alone = statistics.fmean(v.duration_s for v in pp_vecs)
    comm_frac = sum(v.comm_s for v in tp_vecs) / sum(v.duration_s for v in tp_vecs)
    if args.trace_dir is not None:
        _write_trace(res.liger_timeline, args.trace_dir, cfg, args.device)

    ms = lambda s: f"{s * 1e3:.1f}"  # noqa: E731
    print(
        f"bench=liger-headline device={args.device} tp={args.tp} hidden={cfg.hidden} "
        f"layers={cfg.num_layers} reqs={args.reqs} "
        f"throughput_ratio={res.throughput_ratio:.2f} "
        f"paper_throughput_ratio={PAPER_THROUGHPUT_RATIO} "
        f"latency_vs_pp={res.latency_vs_pp:+.2f} paper_latency_vs_pp={PAPER_LATENCY_VS_PP} "
        f"latency_vs_tp={res.latency_vs_tp:+.2f} "
        f"tp_req_s={res.tp.req_s:.2f} liger_req_s={res.liger.req_s:.2f} "
        f"pp_req_s={res.pp.req_s:.2f} rate_req_s={res.rate_req_s:.2f} "
        f"liger_ms={ms(res.liger_at_rate.mean_latency_s)} "
        f"pp_ms={ms(res.pp_at_rate.mean_latency_s)} tp_ms={ms(res.tp_at_rate.mean_latency_s)} "
        f"tp_rate_req_s={res.tp_rate_req_s:.2f} "
        f"liger_ms_at_tp_rate={ms(res.liger_at_tp_rate.mean_latency_s)} "
        f"tp_ms_at_tp_rate={ms(res.tp_at_tp_rate.mean_latency_s)} "
        f"tp_alone_ms={ms(tp_alone)} pp_alone_ms={ms(pp_alone)} tp_comm_frac={comm_frac:.2f} "
        f"plan_slowdown={cost.contention.compute:.2f}/{cost.contention.comm:.2f} "
        f"sim_slowdown={hardware.compute:.2f}/{hardware.comm:.2f} "
        f"arrivals={args.arrivals} load={args.load}"
    )
    return 0


def _write_trace(timeline: Timeline, out: Path, cfg: TransformerConfig, device: str) -> None:
    """Chrome trace and PNG of a slice of Liger's saturated run: from the middle of the
    run, as long as six layers take on average."""
    out.mkdir(parents=True, exist_ok=True)
    per_layer = timeline.makespan_s / len(timeline.schedule.vectors) / cfg.num_layers
    t0 = timeline.makespan_s / 2
    t1 = t0 + 6 * per_layer
    window = timeline.window(t0, t1)
    window.to_chrome_trace(out / "liger_headline.trace.json")
    window.plot(
        out / "liger_headline.png",
        start_s=t0,
        end_s=t1,
        title=f"Liger, TP=4 on {device}, {cfg.name} layers (simulated, saturated)",
    )
    log.info("wrote %s", out)
