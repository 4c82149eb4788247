"""Attention kernels: the blockwise fallback vs jax.nn.dot_product_attention on CPU; Pallas
flash and paged attention vs cuDNN, XLA and the card's HBM bandwidth on a GPU.

CPU (always): causal prefill, ``B=1``, ``H`` query heads over ``K`` KV heads, f32, at each
``--seqs`` length S (T = S). Both sides are compiled once; the line gives each side's
compiled temp memory (``memory_analysis().temp_size_in_bytes``) and best-of-``--repeats``
time, and the ratios (``mem_ratio`` = peer / ours, ``speedup`` = peer time / ours). The peer
is ``jax.nn.dot_product_attention(implementation="xla")``, which materialises the S x S
logits; it is not run where its temp memory would exceed ``--max-peer-gib`` (its memory is
still reported).

CPU paged (always): SmolLM2's attention shape (9 query / 3 KV heads, D=64, 16-token pages of
each ``--cpu-page-dtypes``, block tables shuffled over the pool) in the engine's steps:
``--cpu-decode-seqs`` decodes at contexts drawn from [150, 500], and a mixed step (a 480-token
prefill chunk plus 32 decodes). The C++ kernel against the pure-JAX fallback, both through
``dispatch.ragged_paged_attention``: best-of-``--repeats`` ms, the speedup, GB/s of K/V read
and the error against the float32 reference. Skipped where the C++ kernel is unavailable.

GPU (where one exists): causal bf16 prefill at ``--gpu-seqs`` lengths and head dims 64 and
128 (batch x S = 16k tokens, 2048-wide model), TFLOP/s of our Pallas flash kernel, of
``dot_product_attention(implementation="cudnn")`` and of ``"xla"`` (causal FLOPs: half of
4·B·H·S²·D); then paged decode (bf16, 32 query / 8 KV heads, D=128, 16-token pages) at a few
batch sizes and context lengths: achieved GB/s of K/V read against the card's HBM bandwidth.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ligerjax.kernels import (
    dispatch,
    flash_attention,
    paged_attention,
    paged_attention_reference,
)
from ligerjax.kernels.block_sizes import paged_block_sizes
from ligerjax.kernels.native_attention import native_available
from ligerjax.kernels.paged_attention import num_splits_for

# Peak HBM bandwidth (GB/s) by device kind (first matching substring, lower case).
HBM_GBPS: tuple[tuple[str, float], ...] = (
    ("h200", 4800.0),
    ("h100 pcie", 2000.0),
    ("h100", 3350.0),
    ("a100-sxm4-80gb", 2039.0),
    ("a100-pcie-80gb", 1935.0),
    ("a100", 1555.0),
    ("l40s", 864.0),
    ("a10g", 600.0),
    ("l4", 300.0),
    ("v100", 900.0),
    ("b200", 8000.0),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seqs", default="2048,4096,8192,16384", help="CPU sequence lengths")
    parser.add_argument("--heads", type=int, default=2, help="CPU query heads")
    parser.add_argument("--kv-heads", type=int, default=1, help="CPU KV heads")
    parser.add_argument("--head-dim", type=int, default=64, help="CPU head dim")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-peer-gib", type=float, default=6.0, help="skip bigger peer runs")
    parser.add_argument("--gpu-seqs", default="1024,2048,4096,8192,16384")
    parser.add_argument("--gpu-tokens", type=int, default=16384, help="batch x S on the GPU")
    parser.add_argument("--tune", action="store_true", help="GPU: also time grids of tile sizes")
    parser.add_argument("--tune-seqs", default="8192", help="S of the flash tile grid")
    parser.add_argument(
        "--flash-tiles", default="", help="flash tiles to tune, BQxBKxWARPSxSTAGES,... (a grid)"
    )
    parser.add_argument(
        "--paged-tiles",
        default="",
        help="paged tiles to tune, PAGESxWARPSxSTAGESxSPLITS,... (SPLITS scales the default)",
    )
    parser.add_argument(
        "--cpu-decode-seqs", default="16,64", help="CPU paged: sequences per decode step"
    )
    parser.add_argument(
        "--cpu-page-dtypes", default="float32,bfloat16", help="CPU paged: K/V page dtypes"
    )
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--skip-gpu", action="store_true")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
    jax.block_until_ready(fn())  # warm up
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def _fmt(x: float, digits: int = 2) -> str:
    return "nan" if not np.isfinite(x) else f"{x:.{digits}f}"


@dataclass(frozen=True)
class CpuResult:
    S: int
    ours_mib: float
    peer_mib: float
    ours_ms: float
    peer_ms: float

    def line(self, args: argparse.Namespace) -> str:
        return (
            f"bench=attention impl=fallback S={self.S} B=1 H={args.heads} K={args.kv_heads} "
            f"D={args.head_dim} dtype=float32 causal=1 fallback_temp_mib={_fmt(self.ours_mib)} "
            f"dpa_temp_mib={_fmt(self.peer_mib)} "
            f"mem_ratio={_fmt(self.peer_mib / self.ours_mib, 1)} "
            f"fallback_ms={_fmt(self.ours_ms, 1)} dpa_ms={_fmt(self.peer_ms, 1)} "
            f"speedup={_fmt(self.peer_ms / self.ours_ms)}"
        )


def _cpu_setting(S: int, args: argparse.Namespace, device: jax.Device) -> CpuResult:
    B, H, K, D = 1, args.heads, args.kv_heads, args.head_dim
    rng = np.random.default_rng(S)
    q = jax.device_put(rng.standard_normal((B, S, H, D), np.float32), device)
    k = jax.device_put(rng.standard_normal((B, S, K, D), np.float32), device)
    v = jax.device_put(rng.standard_normal((B, S, K, D), np.float32), device)
    pos = jax.device_put(np.arange(S, dtype=np.int32)[None], device)
    lens = jax.device_put(np.full((B,), S, np.int32), device)
    scale = D**-0.5

    def ours(q, k, v, pos, lens):
        return dispatch.dense_attention(
            q, k, v, pos, lens, causal=True, sm_scale=scale, impl="fallback"
        )

    def peer(q, k, v, pos, lens):
        del pos, lens
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")

    out = {}
    for name, fn in (("ours", ours), ("peer", peer)):
        compiled = jax.jit(fn).lower(q, k, v, pos, lens).compile()
        mib = compiled.memory_analysis().temp_size_in_bytes / 2**20
        ms = float("nan")
        if name == "ours" or mib <= args.max_peer_gib * 1024:
            ms = 1e3 * _best_seconds(lambda c=compiled: c(q, k, v, pos, lens), args.repeats)
        out[name] = (mib, ms)
    return CpuResult(S, out["ours"][0], out["peer"][0], out["ours"][1], out["peer"][1])


@dataclass(frozen=True)
class CpuPagedProblem:
    """One engine step over paged K/V in SmolLM2's shape (see the module doc)."""

    name: str
    args: tuple[jax.Array, ...]  # q [T, H, D], pages [N, P, K, D] x2, tables, lens, cu_q_lens

    @staticmethod
    def make(
        name: str, q_lens: Sequence[int], contexts: Sequence[int], dtype: str = "float32"
    ) -> CpuPagedProblem:
        H, K, D, P = 9, 3, 64, 16
        rng = np.random.default_rng(len(q_lens) + sum(contexts))
        M = -(-max(contexts) // P)
        tables = (1 + rng.permutation(len(q_lens) * M)).reshape(-1, M).astype(np.int32)
        pages = (1 + tables.size, P, K, D)
        cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
        normal = lambda *shape, dt=jnp.float32: jnp.asarray(rng.standard_normal(shape), dt)  # noqa: E731
        args = (normal(int(cu[-1]), H, D), normal(*pages, dt=dtype), normal(*pages, dt=dtype))
        return CpuPagedProblem(
            name, (*args, jnp.asarray(tables), jnp.asarray(contexts, jnp.int32), jnp.asarray(cu))
        )

    @property
    def bytes_read(self) -> int:  # K and V of every context
        _, k_pages, _, _, lens, _ = self.args
        K, D = k_pages.shape[2:]
        return 2 * int(jnp.sum(lens)) * K * D * k_pages.dtype.itemsize

    def run(self, impl: str) -> Callable[[], jax.Array]:
        fn = jax.jit(lambda *a: dispatch.ragged_paged_attention(*a, impl=impl))
        return lambda: fn(*self.args)


def _cpu_paged_lines(
    name: str, seqs: int, args: argparse.Namespace, dtype: str = "float32"
) -> list[str]:
    rng = np.random.default_rng(seqs)
    if name == "mixed":
        contexts = [480, *rng.integers(150, 400, seqs).tolist()]
        problem = CpuPagedProblem.make("mixed", [480] + [1] * seqs, contexts, dtype)
    else:
        contexts = rng.integers(150, 500, seqs).tolist()
        problem = CpuPagedProblem.make("decode", [1] * seqs, contexts, dtype)
    native = problem.run("native")
    err = _rel_err(native(), problem.run("reference")())
    native_s = _best_seconds(native, args.repeats)
    fallback_s = _best_seconds(problem.run("fallback"), args.repeats)
    T = problem.args[0].shape[0]
    return [
        f"bench=attention impl=native-paged step={problem.name} T={T} B={len(contexts)} "
        f"H=9 K=3 D=64 P=16 dtype={dtype} native_ms={1e3 * native_s:.2f} "
        f"fallback_ms={1e3 * fallback_s:.2f} speedup={fallback_s / native_s:.2f} "
        f"native_gb_s={problem.bytes_read / native_s / 1e9:.1f} err_vs_f32={err:.1e}"
    ]


def _gpu_seconds(fn: Callable[[], jax.Array], repeats: int) -> float:
    """Median seconds per call on the GPU.

    Calls are queued back to back (JAX dispatches asynchronously; one stream runs them in
    order), about 20 ms of them per repeat, so the launch gaps hide behind the kernels.
    """
    jax.block_until_ready(fn())  # compile, warm up
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    calls = int(np.clip(0.02 / max(time.perf_counter() - t0, 1e-6), 1, 200))
    per_call = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = fn()
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - t0) / calls)
    return float(np.median(per_call))


def _rel_err(x: jax.Array, ref: jax.Array) -> float:
    """``||x - ref|| / ||ref||`` in float32."""
    x32, ref32 = x.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.linalg.norm(x32 - ref32) / jnp.linalg.norm(ref32))


@dataclass(frozen=True)
class FlashProblem:
    """Causal bf16 prefill: ``B`` sequences of ``S`` tokens, ``H = 2048 / D`` heads (MHA)."""

    q: jax.Array  # [B, S, H, D]
    k: jax.Array  # [B, S, H, D]
    v: jax.Array  # [B, S, H, D]

    @staticmethod
    def make(S: int, D: int, tokens: int) -> FlashProblem:
        B, H = max(1, tokens // S), 2048 // D
        rng = np.random.default_rng(S + D)
        q, k, v = (jnp.asarray(rng.standard_normal((B, S, H, D)), jnp.bfloat16) for _ in range(3))
        return FlashProblem(q, k, v)

    @property
    def flops(self) -> float:
        B, S, H, D = self.q.shape
        return 4 * B * H * S * S * D / 2  # causal: half the logits

    def tag(self) -> str:
        B, S, H, D = self.q.shape
        return f"S={S} B={B} H={H} D={D} dtype=bfloat16 causal=1"

    def ours(self, **tiles: int) -> Callable[[], jax.Array]:
        B, S = self.q.shape[:2]
        pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        lens = jnp.full((B,), S, jnp.int32)
        fn = jax.jit(
            lambda q, k, v: flash_attention(q, k, v, q_positions=pos, kv_lengths=lens, **tiles)
        )
        return lambda: fn(self.q, self.k, self.v)

    def peer(self, implementation: str) -> Callable[[], jax.Array]:
        fn = jax.jit(
            lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, is_causal=True, implementation=implementation
            )
        )
        return lambda: fn(self.q, self.k, self.v)


def _timed(fn: Callable[[], jax.Array], what: str, repeats: int) -> tuple[float, jax.Array | None]:
    """Median seconds per call of ``fn`` and its output, or nan and None where it fails (a peer
    unavailable on this card, a tile that does not fit in shared memory)."""
    try:
        out = jax.block_until_ready(fn())
        return _gpu_seconds(fn, repeats), out
    except Exception as e:
        tqdm.write(f"# {what} failed: {type(e).__name__}: {str(e)[:300]}", sys.stderr)
        return float("nan"), None


def _tflops_or_nan(
    problem: FlashProblem, fn: Callable[[], jax.Array], what: str, repeats: int
) -> tuple[float, jax.Array | None]:
    seconds, out = _timed(fn, what, repeats)
    return problem.flops / seconds / 1e12, out


def _gpu_flash_lines(S: int, D: int, args: argparse.Namespace) -> list[str]:
    problem = FlashProblem.make(S, D, args.gpu_tokens)
    tflops, outs = {}, {}
    for name, fn in (
        ("cudnn", problem.peer("cudnn")),
        ("xla", problem.peer("xla")),
        ("flash", problem.ours()),
    ):
        tflops[name], outs[name] = _tflops_or_nan(
            problem, fn, f"{name} {problem.tag()}", args.repeats
        )
    err = float("nan")
    if outs["flash"] is not None and outs["cudnn"] is not None:
        err = _rel_err(outs["flash"], outs["cudnn"])
    return [
        f"bench=attention impl=pallas {problem.tag()} "
        f"flash_tflops={_fmt(tflops['flash'], 1)} cudnn_tflops={_fmt(tflops['cudnn'], 1)} "
        f"xla_tflops={_fmt(tflops['xla'], 1)} "
        f"vs_cudnn={_fmt(tflops['flash'] / tflops['cudnn'])} "
        f"vs_xla={_fmt(tflops['flash'] / tflops['xla'])} err_vs_cudnn={err:.1e} "
        f"device={_device_tag()}"
    ]


# Flash tiles tried by --tune: (block_q, block_k, num_warps, num_stages).
FLASH_TUNE_GRID = tuple(
    (bq, bk, w, st) for bq in (64, 128) for bk in (32, 64, 128) for w in (4, 8) for st in (2, 3)
)


def _tiles(text: str, grid: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
    """``"128x64x4x3,64x64x4x2"`` as tuples of four ints; the default grid when empty."""
    tiles = tuple(tuple(int(x) for x in t.split("x")) for t in text.split(",") if t.strip())
    if any(len(t) != 4 for t in tiles):
        raise ValueError(f"tiles {text!r}: each must be four integers joined by 'x'")
    return tiles or grid


def _gpu_flash_tune_lines(S: int, D: int, args: argparse.Namespace) -> list[str]:
    problem = FlashProblem.make(S, D, args.gpu_tokens)
    cudnn, ref = _tflops_or_nan(problem, problem.peer("cudnn"), "cudnn", args.repeats)
    lines = []
    grid = _tiles(args.flash_tiles, FLASH_TUNE_GRID)
    for bq, bk, w, st in tqdm(grid, desc=f"flash tiles D={D}", file=sys.stderr):
        fn = problem.ours(block_q=bq, block_k=bk, num_warps=w, num_stages=st)
        tflops, out = _tflops_or_nan(problem, fn, f"tiles {bq}x{bk} w{w} s{st}", args.repeats)
        err = float("nan") if out is None or ref is None else _rel_err(out, ref)
        lines.append(
            f"bench=attention-tune impl=pallas {problem.tag()} block_q={bq} block_k={bk} "
            f"num_warps={w} num_stages={st} flash_tflops={_fmt(tflops, 1)} "
            f"vs_cudnn={_fmt(tflops / cudnn)} err_vs_cudnn={err:.1e} device={_device_tag()}"
        )
    return lines


@dataclass(frozen=True)
class PagedProblem:
    """bf16 decode over 16-token pages: 32 query / 8 KV heads, D=128, block tables shuffled."""

    q: jax.Array  # [B, H, D]
    k_pages: jax.Array  # [N, P, K, D]
    v_pages: jax.Array  # [N, P, K, D]
    tables: jax.Array  # [B, M] int32
    lens: jax.Array  # [B] int32

    @staticmethod
    def make(B: int, ctx: int) -> PagedProblem:
        H, K, D, P = 32, 8, 128, 16
        M = ctx // P
        rng = np.random.default_rng(B + ctx)
        tables = (1 + rng.permutation(B * M)).reshape(B, M).astype(np.int32)
        pages = (1 + B * M, P, K, D)
        return PagedProblem(
            q=jnp.asarray(rng.standard_normal((B, H, D)), jnp.bfloat16),
            k_pages=jnp.asarray(rng.standard_normal(pages), jnp.bfloat16),
            v_pages=jnp.asarray(rng.standard_normal(pages), jnp.bfloat16),
            tables=jnp.asarray(tables),
            lens=jnp.full((B,), ctx, jnp.int32),
        )

    @property
    def bytes_read(self) -> int:
        B, H, D = self.q.shape
        ctx, K = self.tables.shape[1] * self.k_pages.shape[1], self.k_pages.shape[2]
        return 2 * B * ctx * K * D * 2 + 2 * B * H * D * 2

    def tag(self) -> str:
        B, H, D = self.q.shape
        P, K = self.k_pages.shape[1:3]
        ctx = self.tables.shape[1] * P
        return f"B={B} ctx={ctx} H={H} K={K} D={D} P={P} dtype=bfloat16"

    def ours(self, **tiles: int) -> Callable[[], jax.Array]:
        fn = jax.jit(lambda q, kp, vp: paged_attention(q, kp, vp, self.tables, self.lens, **tiles))
        return lambda: fn(self.q, self.k_pages, self.v_pages)

    def reference(self) -> jax.Array:  # [B, H, D] f32
        with jax.default_matmul_precision("highest"):
            return paged_attention_reference(
                self.q.astype(jnp.float32),
                self.k_pages.astype(jnp.float32),
                self.v_pages.astype(jnp.float32),
                self.tables,
                self.lens,
            )


def _paged_fields(
    problem: PagedProblem, fn: Callable[[], jax.Array], ref: jax.Array, repeats: int
) -> str:
    seconds, out = _timed(fn, f"paged {problem.tag()}", repeats)
    err = float("nan") if out is None else _rel_err(out, ref)
    gbps, hbm = problem.bytes_read / seconds / 1e9, _hbm_gbps()
    return (
        f"us={_fmt(seconds * 1e6, 1)} gbps={_fmt(gbps, 0)} hbm_gbps={_fmt(hbm, 0)} "
        f"hbm_frac={_fmt(gbps / hbm)} err_vs_f32={err:.1e} device={_device_tag()}"
    )


def _gpu_paged_lines(B: int, ctx: int, args: argparse.Namespace) -> list[str]:
    problem = PagedProblem.make(B, ctx)
    fields = _paged_fields(problem, problem.ours(), problem.reference(), args.repeats)
    return [f"bench=attention impl=paged {problem.tag()} {fields}"]


# Paged tiles tried by --tune: (pages_per_block, num_warps, num_stages, split multiplier).
PAGED_TUNE_GRID = tuple(
    (ppb, w, st, x) for ppb in (2, 4, 8) for w in (4, 8) for st in (2, 3) for x in (1, 4)
)


def _gpu_paged_tune_lines(B: int, ctx: int, args: argparse.Namespace) -> list[str]:
    problem = PagedProblem.make(B, ctx)
    ref = problem.reference()
    K, tables = problem.k_pages.shape[2], problem.tables.shape[1]
    lines = []
    grid = _tiles(args.paged_tiles, PAGED_TUNE_GRID)
    for ppb, w, st, x in tqdm(grid, desc=f"paged tiles B={B}", file=sys.stderr):
        target = paged_block_sizes(problem.q.shape[2]).target_programs * x
        splits = num_splits_for(B, K, -(-tables // ppb), target)
        fn = problem.ours(pages_per_block=ppb, num_splits=splits, num_warps=w, num_stages=st)
        lines.append(
            f"bench=attention-tune impl=paged {problem.tag()} pages_per_block={ppb} "
            f"num_splits={splits} num_warps={w} num_stages={st} "
            f"{_paged_fields(problem, fn, ref, args.repeats)}"
        )
    return lines


def _gpu_devices() -> list[jax.Device]:
    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


def _device_tag() -> str:
    return jax.devices()[0].device_kind.replace(" ", "-")


def _hbm_gbps() -> float:
    kind = jax.devices()[0].device_kind.lower()
    for key, gbps in HBM_GBPS:
        if key in kind:
            return gbps
    return float("nan")


GPU_SETTINGS: dict[str, Callable[[int, int, argparse.Namespace], list[str]]] = {
    "flash": _gpu_flash_lines,
    "paged": _gpu_paged_lines,
    "flash-tune": _gpu_flash_tune_lines,
    "paged-tune": _gpu_paged_tune_lines,
}


def run(args: argparse.Namespace) -> int:
    settings: list[tuple[str, tuple[Any, ...]]] = []
    if not args.skip_cpu:
        settings += [("cpu", (S,)) for S in _ints(args.seqs)]
        if native_available():
            for dtype in filter(None, args.cpu_page_dtypes.split(",")):
                B_list = _ints(args.cpu_decode_seqs)
                settings += [("cpu-paged", ("decode", B, dtype)) for B in B_list]
                settings += [("cpu-paged", ("mixed", 32, dtype))]
    gpu = bool(_gpu_devices()) and not args.skip_gpu
    if gpu:
        settings += [("flash", (S, D)) for D in (64, 128) for S in _ints(args.gpu_seqs)]
        settings += [("paged", (B, ctx)) for B in (1, 8, 64) for ctx in (1024, 4096, 16384)]
        if args.tune:
            settings += [("flash-tune", (S, D)) for S in _ints(args.tune_seqs) for D in (64, 128)]
            settings += [("paged-tune", (B, ctx)) for B, ctx in ((8, 16384), (64, 4096))]
    elif not args.skip_gpu:
        tqdm.write("# no GPU here: GPU settings skipped", sys.stderr)
    cpu = jax.devices("cpu")[0]
    for kind, params in tqdm(settings, desc="attention", unit="setting", file=sys.stderr):
        if kind == "cpu":
            lines = [_cpu_setting(params[0], args, cpu).line(args)]
        elif kind == "cpu-paged":
            lines = _cpu_paged_lines(params[0], params[1], args, params[2])
        else:
            lines = GPU_SETTINGS[kind](params[0], params[1], args)
        for line in lines:
            tqdm.write(line, sys.stdout)
    return 0
