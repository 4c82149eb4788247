"""Run passes in order; optionally verify each result and dump its jaxpr."""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import numpy as np

from ligerjax.compiler import ir
from ligerjax.compiler.trace import Traced

log = logging.getLogger(__name__)

DUMP_ENV = "LIGERJAX_DUMP_DIR"


class VerificationError(ValueError):
    """A pass produced a malformed program or one whose numerics differ from the original."""


@dataclasses.dataclass(frozen=True)
class PassContext:
    """What every pass may read: the mesh, axis names, partition rules and debug switches.

    ``partition_rules`` is a sequence of ``(regex, split_dim | None)`` matched against
    parameter paths; they take precedence over a pass's defaults. ``pp_axis`` names the
    mesh axis the pipeline pass puts stages on (None: no pipeline), cut into
    ``num_microbatches`` micro-batches; ``cost_model`` (a ``ligerjax.cost.CostModel``)
    prices ops for stage balancing and interleaving (None: the passes' default).
    ``strict`` makes a split value reaching a primitive without a split rule an error
    instead of an all-gather.
    """

    mesh: jax.sharding.Mesh | None = None
    tp_axis: str = "tp"
    pp_axis: str | None = None
    num_microbatches: int = 1
    cost_model: Any = None
    partition_rules: tuple[tuple[str, int | None], ...] = ()
    strict: bool = False
    debug: bool = False
    dump_dir: str | None = None
    atol: float = 1e-5
    rtol: float = 1e-5

    def __post_init__(self) -> None:
        if self.num_microbatches < 1:
            raise ValueError(f"PassContext.num_microbatches={self.num_microbatches}: must be >= 1")


@dataclasses.dataclass(frozen=True)
class PassReport:
    """What a pass did: rewrites per kind, fallbacks taken per primitive name, and time."""

    name: str
    rewrites: dict[str, int] = dataclasses.field(default_factory=dict)
    fallbacks: dict[str, int] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    @property
    def num_fallbacks(self) -> int:
        return sum(self.fallbacks.values())


class Program(Protocol):
    """What passes hand each other: an inspectable jaxpr and a callable."""

    jaxpr: ir.ClosedJaxpr

    def __call__(self, weights: Sequence[jax.Array], *args: Any) -> Any: ...


PassFn = Callable[[Any, PassContext], tuple[Any, PassReport]]


def _pass_name(p: PassFn) -> str:
    return getattr(p, "pass_name", getattr(p, "__name__", type(p).__name__))


def _random_like(x: Any, rng: np.random.Generator) -> Any:
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.floating):
        return rng.standard_normal(x.shape).astype(x.dtype)
    return x  # integer inputs (token ids, positions) keep their example values


class PassManager:
    """Runs ``passes`` in order over a traced model."""

    def __init__(self, passes: Sequence[PassFn]):
        self.passes = tuple(passes)

    def run(self, traced: Traced, ctx: PassContext) -> tuple[Any, list[PassReport]]:
        """Apply every pass; returns the final program and one report per pass."""
        dump_dir = dump_dir_of(ctx)
        if dump_dir:
            dump_jaxpr(dump_dir, 0, "traced", traced.jaxpr)
        program: Any = traced
        reports: list[PassReport] = []
        for i, p in enumerate(self.passes, start=1):
            name = _pass_name(p)
            t0 = time.perf_counter()
            program, report = p(program, ctx)
            report = dataclasses.replace(report, seconds=time.perf_counter() - t0)
            log.info("pass %s: rewrites=%s fallbacks=%s", name, report.rewrites, report.fallbacks)
            reports.append(report)
            if dump_dir:
                dump_jaxpr(dump_dir, i, name, program.jaxpr)
            if ctx.debug:
                verify(traced, program, ctx, name)
        return program, reports


def dump_dir_of(ctx: PassContext) -> str | None:
    """Where to dump jaxprs: ``ctx.dump_dir``, else ``$LIGERJAX_DUMP_DIR``, else nowhere."""
    return ctx.dump_dir or os.environ.get(DUMP_ENV)


def dump_jaxpr(dump_dir: str, index: int, name: str, jaxpr: ir.ClosedJaxpr) -> None:
    """Write ``jaxpr`` as ``{index:02d}_{name}.jaxpr.txt`` under ``dump_dir``."""
    path = pathlib.Path(dump_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / f"{index:02d}_{name}.jaxpr.txt").write_text(str(jaxpr))


def verify(traced: Traced, program: Program, ctx: PassContext, name: str = "pass") -> None:
    """Check well-formedness, unchanged output avals, and numerics on random float inputs."""
    try:
        ir.check_well_formed(program.jaxpr)
    except ValueError as e:
        raise VerificationError(f"{name}: malformed jaxpr: {e}") from e
    rng = np.random.default_rng(0)
    args = jax.tree_util.tree_map(lambda x: _random_like(x, rng), traced.example_args)
    want = jax.tree_util.tree_leaves(traced(traced.weights, *args))
    got = jax.tree_util.tree_leaves(program(traced.weights, *args))
    if [(w.shape, w.dtype) for w in want] != [(g.shape, g.dtype) for g in got]:
        raise VerificationError(
            f"{name}: outputs changed from {[(w.shape, w.dtype) for w in want]} "
            f"to {[(g.shape, g.dtype) for g in got]}"
        )
    for i, (w, g) in enumerate(zip(want, got, strict=True)):
        if not np.allclose(np.asarray(g), np.asarray(w), atol=ctx.atol, rtol=ctx.rtol):
            err = float(np.max(np.abs(np.asarray(g) - np.asarray(w))))
            raise VerificationError(f"{name}: output {i} differs from the original by {err}")
