"""Function vectors of a GLM-130B-sized transformer, and Liger's request stream.

The model: GLM-130B's width (hidden 12288, 96 heads of 128, fp16, 70 layers). Its MLP is a
GeGLU of width 32768 (three 12288 x 32768 matrices); we model it as a plain GELU MLP of
width 4 x 12288 = 49152 (two matrices), as Liger's prototype does. Both have 8 x 12288^2
weights per layer, hence the same FLOPs and weight bytes per token; the plain MLP has one
up-projection GEMM instead of two, so the function vector has one op fewer per layer.
Attention is bidirectional over each sequence (the prototype's BERT-style layer).

A tensor-parallel layer on one device of ``tp`` (Megatron split: heads and MLP columns
split, out-proj and MLP down-proj rows split, an all-reduce after each):
``ln_attn, qkv, attention, out_proj, all_reduce, ln_mlp, mlp_up, gelu, mlp_down,
all_reduce``. Durations come from the cost model's roofline and ring all-reduce. Every op
is splittable along its tokens (``rows``); a GEMM piece still reads all the weights
(``fixed_bytes``), and an attention piece all the keys and values.

A pipeline-parallel request runs the layers of stage ``s`` on device ``s`` at full width
and sends its activations to the next stage (a permute).

The request stream follows Liger's public artifact (its ``main.cu`` and ``schedule.h``):
every request is a batch of 2 sequences whose length is drawn uniformly from [16, 115]
(``max_seq_len`` 128), arriving at a fixed interval.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from ligerjax.cost.cost_model import CostModel
from ligerjax.schedule.function_vector import (
    COMM,
    COMPUTE,
    PRIMARY,
    BatchRole,
    FunctionVector,
    Op,
)

_ITEMSIZE: Mapping[str, int] = MappingProxyType(
    {"float16": 2, "bfloat16": 2, "float32": 4, "float8_e4m3fn": 1}
)


@dataclass(frozen=True)
class TransformerConfig:
    """A decoder/encoder stack's shape. ``ffn`` is the width of a two-matrix MLP."""

    name: str = "glm-130b"
    hidden: int = 12288
    heads: int = 96
    head_dim: int = 128
    ffn: int = 4 * 12288  # GLM-130B: GeGLU 32768 x 3 matrices = the same weights and FLOPs
    num_layers: int = 70
    dtype: str = "float16"

    def __post_init__(self) -> None:
        for name in ("hidden", "heads", "head_dim", "ffn", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"TransformerConfig.{name}={getattr(self, name)}: must be >= 1")
        if self.dtype not in _ITEMSIZE:
            raise ValueError(f"TransformerConfig.dtype={self.dtype!r}: one of {sorted(_ITEMSIZE)}")

    @property
    def itemsize(self) -> int:
        """Bytes per element of weights and activations."""
        return _ITEMSIZE[self.dtype]

    @property
    def layer_params(self) -> int:
        """Weights per layer (attention 4 E^2 with H*D = E, MLP 2 E F)."""
        attn = self.hidden * self.heads * self.head_dim * 4
        return attn + 2 * self.hidden * self.ffn


GLM_130B = TransformerConfig()


def _check_shape(batch: int, seq_len: int) -> None:
    if batch < 1:
        raise ValueError(f"batch={batch}: must be >= 1")
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len}: must be >= 1")


def _compute(
    name: str,
    cost: CostModel,
    flops: float,
    nbytes: float,
    rows: int,
    dtype: str,
    fixed: float = 0.0,
) -> Op:
    """A compute op with its roofline duration, splittable along ``rows``."""
    return Op(
        name,
        COMPUTE,
        duration_s=cost.op_duration(flops, nbytes, dtype),
        flops=flops,
        bytes=nbytes,
        rows=rows,
        fixed_bytes=fixed,
        dtype=dtype,
    )


def _gemm(name: str, cost: CostModel, m: int, k: int, n: int, b: int, dtype: str) -> Op:
    """[m, k] @ [k, n]: every piece of it reads all the weights [k, n]."""
    weights = float(k * n * b)
    return _compute(name, cost, 2.0 * m * k * n, weights + (m * k + m * n) * b, m, dtype, weights)


def _elementwise(
    name: str, cost: CostModel, m: int, width: int, b: int, dtype: str, arrays: int, flops: float
) -> Op:
    """A streaming op over [m, width]: ``arrays`` arrays in and out, ``flops`` per element."""
    return _compute(name, cost, flops * m * width, float(arrays * m * width * b), m, dtype)


def _all_reduce(cost: CostModel, m: int, e: int, b: int, dtype: str, tp: int) -> Op:
    nbytes = float(m * e * b)
    return Op(
        "all_reduce",
        COMM,
        duration_s=cost.all_reduce(nbytes, tp),
        bytes=nbytes,
        rows=m,
        dtype=dtype,
        collective="all_reduce",
        group=tp,
    )


def layer_ops(
    cfg: TransformerConfig,
    cost: CostModel,
    *,
    batch: int,
    seq_len: int,
    tp: int = 1,
    layer: int = 0,
    device: int = 0,
    role: BatchRole = PRIMARY,
) -> list[Op]:
    """One layer's ops on one device of a ``tp``-way tensor-parallel group (``tp=1``: the
    whole layer on one device, no all-reduce)."""
    _check_shape(batch, seq_len)
    if tp < 1 or cfg.heads % tp or cfg.ffn % tp:
        raise ValueError(f"tp={tp}: must be >= 1 and divide heads={cfg.heads} and ffn={cfg.ffn}")
    m, e, b, dt = batch * seq_len, cfg.hidden, cfg.itemsize, cfg.dtype
    hd = cfg.heads // tp * cfg.head_dim  # local heads x head dim
    f = cfg.ffn // tp
    # softmax(Q K^T) V per sequence: two GEMMs of 2 S^2 D FLOPs per head; Q, K, V in, O out;
    # a piece (some queries) still reads all the keys and values
    kv = 2.0 * m * hd * b
    attention = _compute(
        "attention", cost, 4.0 * batch * seq_len * seq_len * hd, 2 * kv, m, dt, fixed=kv
    )
    ops = [
        _elementwise("ln_attn", cost, m, e, b, dt, arrays=2, flops=8),
        _gemm("qkv", cost, m, e, 3 * hd, b, dt),
        attention,
        _gemm("out_proj", cost, m, hd, e, b, dt),
        *([_all_reduce(cost, m, e, b, dt, tp)] if tp > 1 else []),
        _elementwise("ln_mlp", cost, m, e, b, dt, arrays=3, flops=9),  # + residual add
        _gemm("mlp_up", cost, m, e, f, b, dt),
        _elementwise("gelu", cost, m, f, b, dt, arrays=2, flops=8),
        _gemm("mlp_down", cost, m, f, e, b, dt),
        *([_all_reduce(cost, m, e, b, dt, tp)] if tp > 1 else []),
    ]
    return [op.replace(layer=layer, device=device, batch=role) for op in ops]


def tp_vector(
    cfg: TransformerConfig,
    cost: CostModel,
    *,
    batch: int,
    seq_len: int,
    tp: int,
    num_layers: int | None = None,
    name: str = "",
    role: BatchRole = PRIMARY,
) -> FunctionVector:
    """A request's forward pass on one device of a ``tp``-way group (the group runs in
    lock-step): ``num_layers`` (default ``cfg.num_layers``) layers of :func:`layer_ops`."""
    layers = cfg.num_layers if num_layers is None else num_layers
    if layers < 1:
        raise ValueError(f"num_layers={layers}: must be >= 1")
    one = layer_ops(cfg, cost, batch=batch, seq_len=seq_len, tp=tp, role=role)
    ops = tuple(op.replace(layer=i) for i in range(layers) for op in one)
    return FunctionVector(ops, name=name, tokens=batch * seq_len)


def stage_layers(num_layers: int, pp: int) -> tuple[int, ...]:
    """Layers per pipeline stage: as even as possible, the larger stages first."""
    if pp < 1 or pp > num_layers:
        raise ValueError(f"pp={pp}: must be in [1, num_layers={num_layers}]")
    base, extra = divmod(num_layers, pp)
    return tuple(base + (1 if s < extra else 0) for s in range(pp))


def pp_vector(
    cfg: TransformerConfig,
    cost: CostModel,
    *,
    batch: int,
    seq_len: int,
    pp: int,
    num_layers: int | None = None,
    name: str = "",
) -> FunctionVector:
    """A request's forward pass through a ``pp``-stage pipeline: stage ``s``'s layers on
    device ``s`` at full width, then a permute of the activations to stage ``s+1``."""
    layers = cfg.num_layers if num_layers is None else num_layers
    one = layer_ops(cfg, cost, batch=batch, seq_len=seq_len, tp=1)
    act = float(batch * seq_len * cfg.hidden * cfg.itemsize)
    ops: list[Op] = []
    layer = 0
    for s, count in enumerate(stage_layers(layers, pp)):
        for _ in range(count):
            ops += [op.replace(layer=layer, device=s) for op in one]
            layer += 1
        if s < pp - 1:
            ops.append(
                Op(
                    "send",
                    COMM,
                    duration_s=cost.permute(act),
                    bytes=act,
                    layer=layer - 1,
                    device=s,
                    dtype=cfg.dtype,
                    collective="permute",
                    group=2,
                )
            )
    return FunctionVector(tuple(ops), name=name, tokens=batch * seq_len)


def liger_requests(
    n: int, *, batch: int = 2, max_seq_len: int = 128, min_seq_len: int = 16, seed: int = 0
) -> tuple[tuple[int, int], ...]:
    """``n`` requests of (batch, seq_len) as Liger's artifact draws them: a fixed batch and
    a length uniform in [min_seq_len, max_seq_len - 13] (16..115 for 128)."""
    if n < 1:
        raise ValueError(f"n={n}: must be >= 1")
    hi = max_seq_len - 13
    if hi < min_seq_len:
        raise ValueError(f"max_seq_len={max_seq_len}: must be >= min_seq_len + 13")
    _check_shape(batch, min_seq_len)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_seq_len, hi + 1, size=n)
    return tuple((batch, int(s)) for s in lengths)


def arrival_times(
    n: int, rate: float, *, pattern: str = "periodic", seed: int = 0
) -> tuple[float, ...]:
    """Arrival times of ``n`` requests at ``rate`` per second: ``periodic`` (a fixed
    interval, as in Liger's artifact; the first at 0) or ``poisson``."""
    if n < 1:
        raise ValueError(f"n={n}: must be >= 1")
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"rate={rate}: must be a positive number")
    if pattern == "periodic":
        return tuple(i / rate for i in range(n))
    if pattern == "poisson":
        gaps = np.random.default_rng(seed).exponential(1 / rate, size=n)
        gaps[0] = 0.0
        return tuple(float(t) for t in np.cumsum(gaps))
    raise ValueError(f"pattern={pattern!r}: 'periodic' or 'poisson'")


def vectors_for(
    requests: Sequence[tuple[int, int]],
    build: str,
    cfg: TransformerConfig,
    cost: CostModel,
    *,
    degree: int,
    num_layers: int | None = None,
) -> tuple[FunctionVector, ...]:
    """One vector per request: ``build`` ``"tp"`` (:func:`tp_vector`) or ``"pp"``
    (:func:`pp_vector`) with ``degree`` devices; equal shapes share one vector's ops."""
    if build not in ("tp", "pp"):
        raise ValueError(f"build={build!r}: 'tp' or 'pp'")
    cache: dict[tuple[int, int], FunctionVector] = {}
    out = []
    for i, (batch, seq) in enumerate(requests):
        if (batch, seq) not in cache:
            if build == "tp":
                cache[batch, seq] = tp_vector(
                    cfg, cost, batch=batch, seq_len=seq, tp=degree, num_layers=num_layers
                )
            else:
                cache[batch, seq] = pp_vector(
                    cfg, cost, batch=batch, seq_len=seq, pp=degree, num_layers=num_layers
                )
        vec = cache[batch, seq]
        out.append(FunctionVector(vec.ops, name=f"req{i}", tokens=vec.tokens))
    return tuple(out)
