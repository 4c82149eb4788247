"""Attention kernels: the blockwise fallback vs jax.nn.dot_product_attention on CPU; Pallas
flash and paged attention vs cuDNN, XLA and the card's HBM bandwidth on a GPU.

CPU (always): causal prefill, ``B=1``, ``H`` query heads over ``K`` KV heads, f32, at each
``--seqs`` length S (T = S). Both sides are compiled once; the line gives each side's
compiled temp memory (``memory_analysis().temp_size_in_bytes``) and best-of-``--repeats``
time, and the ratios (``mem_ratio`` = peer / ours, ``speedup`` = peer time / ours). The peer
is ``jax.nn.dot_product_attention(implementation="xla")``, which materialises the S x S
logits; it is not run where its temp memory would exceed ``--max-peer-gib`` (its memory is
still reported).

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

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ligerjax.kernels import dispatch

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


def _gpu_flash_line(S: int, D: int, args: argparse.Namespace) -> str:
    B = max(1, args.gpu_tokens // S)
    H = 2048 // D
    rng = np.random.default_rng(S + D)
    shape = (B, S, H, D)
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for _ in range(3))
    pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    lens = jnp.full((B,), S, jnp.int32)
    flops = 4 * B * H * S * S * D / 2
    impls: dict[str, Callable[[], jax.Array]] = {
        "flash": jax.jit(
            lambda q, k, v: dispatch.dense_attention(
                q, k, v, pos, lens, causal=True, sm_scale=D**-0.5, impl="pallas"
            )
        ),
        "cudnn": jax.jit(
            lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, is_causal=True, implementation="cudnn"
            )
        ),
        "xla": jax.jit(
            lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, is_causal=True, implementation="xla"
            )
        ),
    }
    tflops = {}
    for name, fn in impls.items():
        try:
            seconds = _best_seconds(lambda f=fn: f(q, k, v), args.repeats)
            tflops[name] = flops / seconds / 1e12
        except Exception as e:  # a peer unavailable on this card: report nan
            tqdm.write(f"# {name} failed at S={S} D={D}: {type(e).__name__}: {e}", sys.stderr)
            tflops[name] = float("nan")
    return (
        f"bench=attention impl=pallas S={S} B={B} H={H} D={D} dtype=bfloat16 causal=1 "
        f"flash_tflops={_fmt(tflops['flash'], 1)} cudnn_tflops={_fmt(tflops['cudnn'], 1)} "
        f"xla_tflops={_fmt(tflops['xla'], 1)} "
        f"vs_cudnn={_fmt(tflops['flash'] / tflops['cudnn'])} "
        f"vs_xla={_fmt(tflops['flash'] / tflops['xla'])} device={_device_tag()}"
    )


def _gpu_paged_line(B: int, ctx: int, args: argparse.Namespace) -> str:
    H, K, D, P = 32, 8, 128, 16
    M = ctx // P
    N = 1 + B * M
    rng = np.random.default_rng(B + ctx)
    tables = (1 + rng.permutation(B * M)).reshape(B, M).astype(np.int32)
    k_pages = jnp.asarray(rng.standard_normal((N, P, K, D)), jnp.bfloat16)
    v_pages = jnp.asarray(rng.standard_normal((N, P, K, D)), jnp.bfloat16)
    q = jnp.asarray(rng.standard_normal((B, H, D)), jnp.bfloat16)
    lens = jnp.full((B,), ctx, jnp.int32)
    bt = jnp.asarray(tables)
    fn = jax.jit(
        lambda q, kp, vp: dispatch.paged_decode_attention(q, kp, vp, bt, lens, impl="pallas")
    )
    seconds = _best_seconds(lambda: fn(q, k_pages, v_pages), args.repeats)
    bytes_read = 2 * B * ctx * K * D * 2 + 2 * B * H * D * 2
    gbps = bytes_read / seconds / 1e9
    hbm = _hbm_gbps()
    return (
        f"bench=attention impl=paged B={B} ctx={ctx} H={H} K={K} D={D} P={P} dtype=bfloat16 "
        f"us={_fmt(seconds * 1e6, 1)} gbps={_fmt(gbps, 0)} hbm_gbps={_fmt(hbm, 0)} "
        f"hbm_frac={_fmt(gbps / hbm)} device={_device_tag()}"
    )


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


def run(args: argparse.Namespace) -> int:
    settings: list[tuple[str, Sequence[int]]] = []
    if not args.skip_cpu:
        settings += [("cpu", (S,)) for S in _ints(args.seqs)]
    gpu = bool(_gpu_devices()) and not args.skip_gpu
    if gpu:
        settings += [("flash", (S, D)) for D in (64, 128) for S in _ints(args.gpu_seqs)]
        settings += [("paged", (B, ctx)) for B in (1, 8, 64) for ctx in (1024, 4096, 16384)]
    elif not args.skip_gpu:
        tqdm.write("# no GPU here: GPU settings skipped", sys.stderr)
    cpu = jax.devices("cpu")[0]
    for kind, params in tqdm(settings, desc="attention", unit="setting", file=sys.stderr):
        if kind == "cpu":
            line = _cpu_setting(params[0], args, cpu).line(args)
        elif kind == "flash":
            line = _gpu_flash_line(params[0], params[1], args)
        else:
            line = _gpu_paged_line(params[0], params[1], args)
        tqdm.write(line, sys.stdout)
    return 0
