"""Interleaved vs sequential steps of @ligerize, planned, compiled and read back.

For each model shape a decode-sized primary batch and a prefill-sized secondary batch run
through ``ligerize(model).plan(...)``: the tensor-parallel pass, the function assembler,
Liger's planner (windows sized by the cost model, at most ``--max-inflation`` of primary
latency spent), decomposition and the emit pass's barriers, then a compile for the target
(deviceless for GPUs) whose scheduled HLO is read back for the overlap coverage. The same
step is compiled once more without the barriers, the peer it is measured against.

Two throughput figures. ``throughput_ratio``: one step, the primary plus the secondary work
its windows took, back to back over the interleaved step (``primary_inflation``: the
primary's latency in that step over its solo latency, minus one). ``sustained_ratio``: the
secondary carried over step after step until its whole prefill is done (the plan's
``sustained``, :func:`~ligerjax.schedule.run_to_completion`): the first step only meets the
prefill's first GEMMs, later ones meet its all-reduces, which must fit the primary's compute
windows (cut along their rows) or run exposed after a primary (``exposed``; they then
lengthen that step: ``worst_step_inflation``, ``mean_step_inflation`` over all the steps).
Throughput is the sustained figure; the first step's is what the compiled program shows.
Models: ``smollm2`` (SmolLM2-135M's shape, TP=3: its 9 heads / 3 KV heads) and ``7b``
(hidden 4096, 32 heads, 2 layers, bf16). Weights are abstract: nothing is allocated.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from ligerjax.bench import rerun_with_cpu_devices
from ligerjax.cost.cost_model import Contention, CostModel
from ligerjax.schedule import FunctionVector, interleave_greedy, simulate, throughput_bound
from passes.interleave import DEFAULT_FACTOR, planner_config

MODELS = ("smollm2", "7b")
TARGETS = ("cpu", "h100", "a100", "a100-pcie")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--target", default="a100-pcie", choices=TARGETS[1:])
    parser.add_argument("--primary-tokens", type=int, default=32)
    parser.add_argument("--secondary-tokens", type=int, default=1024)
    parser.add_argument("--max-inflation", type=float, default=0.05)
    parser.add_argument(
        "--factor",
        type=int,
        default=None,
        help="decomposition granularity: cut at multiples of 1/factor (default: ligerize's)",
    )
    parser.add_argument(
        "--contention",
        type=float,
        nargs="+",
        default=None,
        metavar="F",
        help="slowdown of overlapped ops: F for both kinds, or F_COMPUTE F_COMM "
        "(default: the cost model's 1.25; measure it with `ligerjax bench contention`)",
    )
    parser.add_argument(
        "--no-cpu-compile", action="store_true", help="skip compiling SmolLM2 for this CPU"
    )


@dataclass(frozen=True)
class Shape:
    name: str
    tp: int
    config: object


def _shapes() -> dict[str, Shape]:
    from models import LlamaConfig

    seven_b = LlamaConfig.preset("llama2-7b", num_layers=2)
    return {
        "smollm2": Shape("smollm2-135m", 3, LlamaConfig.preset("smollm2-135m")),
        "7b": Shape("7b-like", 4, seven_b),
    }


def steady_state(
    primary: FunctionVector,
    secondary: FunctionVector,
    cost: CostModel,
    max_inflation: float,
    factor: int = DEFAULT_FACTOR,
) -> tuple[float, float, float]:
    """(interleaved step s, the same work back to back s, primary latency inflation)."""
    config = planner_config(primary, factor=factor, max_inflation=max_inflation)
    plan = interleave_greedy(primary, [secondary], cost=cost, config=config, append_leftover=False)
    timeline = simulate(plan.schedule, cost.contention)
    placed = plan.schedule.vectors[1].duration_s
    inflation = timeline.primary_latency / primary.duration_s - 1
    return timeline.makespan_s, primary.duration_s + placed, inflation


def _ligerized(shape: Shape, args: argparse.Namespace, cost: CostModel):  # type: ignore[no-untyped-def]
    from flax import nnx

    from ligerjax.ligerized import ligerize
    from models import Llama

    model = nnx.eval_shape(lambda: Llama(shape.config, rngs=nnx.Rngs(0)))
    factor = {} if args.factor is None else {"max_factor": args.factor}
    return ligerize(model, max_inflation=args.max_inflation, cost_model=cost, **factor)


def _line(shape: Shape, args: argparse.Namespace, cost: CostModel) -> str:
    lm = _ligerized(shape, args, cost)
    p = (jax.ShapeDtypeStruct((1, args.primary_tokens), jnp.int32),)
    s = (jax.ShapeDtypeStruct((1, args.secondary_tokens), jnp.int32),)
    t0 = time.perf_counter()
    tied = lm.plan(p, s, target=args.target, num_devices=shape.tp)
    plan_s = time.perf_counter() - t0
    plain = lm.plan(p, s, target=args.target, num_devices=shape.tp, barriers=False)
    asm_primary = tied.primary
    secondary = tied.sequential.schedule.vectors[1]
    factor = lm.config.max_factor
    step, back_to_back, inflation = steady_state(
        asm_primary, secondary, cost, args.max_inflation, factor
    )
    run = tied.sustained
    fields = {
        "bench": "interleave",
        "model": shape.name,
        "target": args.target,
        "tp": shape.tp,
        "primary_tokens": args.primary_tokens,
        "secondary_tokens": args.secondary_tokens,
        "step_us": f"{step * 1e6:.1f}",
        "sequential_us": f"{back_to_back * 1e6:.1f}",
        "throughput_ratio": f"{back_to_back / step:.3f}",
        "primary_inflation": f"{inflation:.3f}",
        "sustained_ratio": f"{run.ratio:.3f}",
        "sustained_steps": run.steps,
        "exposed": run.exposed,
        "mean_step_inflation": f"{run.mean_inflation:.3f}",
        "worst_step_inflation": f"{run.worst_inflation:.3f}",
        "coverage": f"{tied.overlap_coverage:.2f}",
        "coverage_no_barriers": f"{plain.overlap_coverage:.2f}",
        "contention": f"{cost.contention.compute:.2f}/{cost.contention.comm:.2f}",
        "factor": factor,
        "throughput_bound": f"{throughput_bound(cost.contention, args.max_inflation):.3f}",
        "comm_fraction": f"{asm_primary.comm_s / asm_primary.duration_s:.3f}",
        "gpu_compile_s": f"{tied.compile_s:.1f}",
        "plan_s": f"{plan_s:.1f}",
    }
    if shape.name.startswith("smollm2") and not args.no_cpu_compile:
        cpu = lm.plan(p, s, target="cpu", num_devices=shape.tp)
        fields["cpu_compile_s"] = f"{cpu.compile_s:.1f}"
    return " ".join(f"{k}={v}" for k, v in fields.items())


def _contention(factors: list[float] | None) -> Contention | None:
    if factors is None:
        return None
    if len(factors) > 2:
        raise SystemExit(f"--contention {factors}: one factor, or two (compute, comm)")
    return Contention(factors[0], factors[-1])


def run(args: argparse.Namespace) -> int:
    need = 0 if args.no_cpu_compile or "smollm2" not in args.models else 3
    if jax.device_count() < need:  # the CPU compile needs 3 devices
        return rerun_with_cpu_devices("interleave")
    from ligerjax.ligerized import PLAN_TARGETS

    contention = _contention(args.contention)
    cost = CostModel.for_device(PLAN_TARGETS[args.target], contention)
    shapes = _shapes()
    for name in tqdm(args.models, desc="bench interleave", unit="model"):
        print(_line(shapes[name], args, cost), flush=True)
    return 0
