"""Read a llama.cpp GGUF file into a :class:`Checkpoint` (config + lazily dequantised tensors).

Three things about GGUF that this module undoes:

- Tensor shapes are listed fastest-varying first (``ne`` order): a torch ``[out, in]`` weight
  is listed ``[in, out]``, and numpy sees the data as ``[out, in]``. Our ``nnx.Linear`` kernel
  is ``[in, out]``, so the listed shape is ours and the data needs a transpose.
- llama.cpp's converter reorders the rows of ``attn_q``/``attn_k`` within each head from the
  Hugging Face rotate-half layout (``[x0..x(D/2-1), y0..y(D/2-1)]``) to interleaved pairs
  (``[x0, y0, x1, y1, ...]``). Our model rotates halves, so the reorder is inverted here.
- Quantised blocks (Q8_0, Q4_0, Q4_1, ...) are dequantised to f32 with ``gguf.quants``.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import gguf
import ml_dtypes
import numpy as np
from gguf import GGMLQuantizationType as QType

from models.checkpoint import (
    Checkpoint,
    CheckpointError,
    MissingMetadataError,
    TensorRef,
    TruncatedCheckpointError,
    UnexpectedTensorError,
    UnknownArchitectureError,
    UnsupportedQuantizationError,
)
from models.config import LlamaConfig, RopeScaling

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama",)

FLOAT_TYPES = (QType.F32, QType.F16, QType.BF16)
QUANT_TYPES = (
    QType.Q8_0,
    QType.Q4_0,
    QType.Q4_1,
    QType.Q5_0,
    QType.Q5_1,
    QType.Q2_K,
    QType.Q3_K,
    QType.Q4_K,
    QType.Q5_K,
    QType.Q6_K,
)
SUPPORTED_TYPES = FLOAT_TYPES + QUANT_TYPES

# llama.cpp block tensor -> (our module path inside the layer, leaf, layout kind)
LAYER_TENSORS: dict[str, tuple[str, str]] = {
    "attn_q": ("self_attn.q_proj.kernel", "q"),
    "attn_k": ("self_attn.k_proj.kernel", "k"),
    "attn_v": ("self_attn.v_proj.kernel", "linear"),
    "attn_output": ("self_attn.o_proj.kernel", "linear"),
    "ffn_gate": ("mlp.gate_proj.kernel", "linear"),
    "ffn_up": ("mlp.up_proj.kernel", "linear"),
    "ffn_down": ("mlp.down_proj.kernel", "linear"),
    "attn_norm": ("input_layernorm.weight", "vector"),
    "ffn_norm": ("post_attention_layernorm.weight", "vector"),
}
GLOBAL_TENSORS: dict[str, tuple[str, str]] = {
    "token_embd": ("embed_tokens.embedding", "embedding"),
    "output_norm": ("norm.weight", "vector"),
    "output": ("lm_head.kernel", "linear"),
}
ROPE_FREQS = "rope_freqs.weight"
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def read_gguf(
    source: str | os.PathLike[str] | gguf.GGUFReader, *, name: str | None = None
) -> Checkpoint:
    """Read a Llama-family GGUF file: config from its metadata, tensors mapped to our paths.

    ``source`` is a path or a reader from :func:`open_gguf` (to share one parse with the
    tokenizer); ``name`` goes into the config (default: the file's stem). Raises a
    :class:`CheckpointError` subclass naming the key, tensor or type for a file of another
    architecture, a truncated file, an unsupported tensor type or an unknown tensor.
    """
    reader = source if isinstance(source, gguf.GGUFReader) else open_gguf(source)
    if name is None:
        name = os.path.splitext(os.path.basename(str(reader.data.filename)))[0]
    config = gguf_config(reader, name=name)
    tensors = {t.name: t for t in reader.tensors}
    rope_freqs = tensors.pop(ROPE_FREQS, None)
    if rope_freqs is not None:
        config = config.replace(rope_scaling=_llama3_from_rope_freqs(reader, rope_freqs, config))
    refs = {}
    for name, tensor in tensors.items():
        path_, ref = _tensor_ref(name, tensor, config)
        refs[path_] = ref
    if "lm_head.kernel" in refs:
        config = config.replace(tie_word_embeddings=False)
    return Checkpoint(config=config, tensors=refs, dtype=_checkpoint_dtype(reader))


def open_gguf(path: str | os.PathLike[str]) -> gguf.GGUFReader:
    """A ``GGUFReader`` for ``path``, after checking the file holds every tensor's bytes."""
    try:
        return _CheckedReader(path)
    except CheckpointError:
        raise
    except (ValueError, IndexError, KeyError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot parse the GGUF header ({e}); corrupt file?") from e


class _CheckedReader(gguf.GGUFReader):
    """``GGUFReader`` that names the tensor a truncated file cuts off, and unknown types."""

    def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
        file_size = len(self.data)
        for field in fields:
            _, name_data, _, dims, raw_dtype, offset = field.parts
            name = bytes(name_data).decode("utf-8", errors="replace")
            try:
                qtype = QType(int(raw_dtype[0]))
            except ValueError:
                raise UnsupportedQuantizationError(
                    f"tensor {name!r}: unknown GGML type id {int(raw_dtype[0])}"
                ) from None
            block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
            n_bytes = math.prod(int(d) for d in dims) * type_size // block_size
            end = start_offs + int(offset[0]) + n_bytes
            if end > file_size:
                raise TruncatedCheckpointError(
                    f"tensor {name!r} needs bytes up to offset {end}, but the file is "
                    f"{file_size} bytes long: truncated GGUF file"
                )
        super()._build_tensors(start_offs, fields)


def gguf_config(reader: gguf.GGUFReader, *, name: str = "llama") -> LlamaConfig:
    """The :class:`LlamaConfig` a GGUF file's metadata describes (assumes tied embeddings)."""
    meta = GGUFMetadata(reader)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnknownArchitectureError(
            f"general.architecture={arch!r}: unsupported architecture; this loader reads "
            f"{SUPPORTED_ARCHITECTURES}"
        )
    hidden = meta.require_int(f"{arch}.embedding_length")
    heads = meta.require_int(f"{arch}.attention.head_count")
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
    _check_head_dims(meta, arch, head_dim)
    tokens = meta.get_field("tokenizer.ggml.tokens")
    vocab = len(tokens.data) if tokens is not None else meta.require_int(f"{arch}.vocab_size")
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=meta.require_int(f"{arch}.feed_forward_length"),
        num_layers=meta.require_int(f"{arch}.block_count"),
        num_heads=heads,
        num_kv_heads=meta.require_int(f"{arch}.attention.head_count_kv", default=heads),
        head_dim=head_dim,
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10_000.0)),
        rope_scaling=_rope_scaling(meta, arch),
        rms_norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings=True,
        max_position_embeddings=meta.require_int(f"{arch}.context_length", default=2048),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=_eos_ids(meta),
        name=name,
    )


class GGUFMetadata:
    """Typed access to a GGUF file's key/value metadata."""

    def __init__(self, reader: gguf.GGUFReader):
        self.reader = reader

    def get_field(self, key: str) -> Any:
        return self.reader.get_field(key)

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.get_field(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        """The value of ``key``; a ``MissingMetadataError`` naming it when absent."""
        value = self.get(key)
        if value is None:
            raise MissingMetadataError(f"GGUF metadata key {key!r} is missing")
        return value

    def require_int(self, key: str, *, default: int | None = None) -> int:
        value = self.get(key, default)
        if value is None:
            raise MissingMetadataError(f"GGUF metadata key {key!r} is missing")
        if isinstance(value, list) or not isinstance(value, int | np.integer):
            raise MissingMetadataError(f"GGUF metadata {key}={value!r}: expected one integer")
        return int(value)


def _check_head_dims(meta: GGUFMetadata, arch: str, head_dim: int) -> None:
    value_dim = int(meta.get(f"{arch}.attention.value_length", head_dim))
    rope_dim = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    if value_dim != head_dim:
        raise CheckpointError(
            f"{arch}.attention.value_length={value_dim} differs from key_length={head_dim}"
        )
    if rope_dim != head_dim:
        raise CheckpointError(
            f"{arch}.rope.dimension_count={rope_dim}: partial rotary embeddings "
            f"(head_dim={head_dim}) are not supported"
        )


def _rope_scaling(meta: GGUFMetadata, arch: str) -> RopeScaling | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor", meta.get(f"{arch}.rope.scale_linear"))
    if kind in (None, "none") and factor in (None, 1.0):
        return None
    if kind in (None, "linear"):
        return RopeScaling(rope_type="linear", factor=float(factor))
    raise CheckpointError(f"{arch}.rope.scaling.type={kind!r}: only 'linear' is supported")


def _eos_ids(meta: GGUFMetadata) -> tuple[int, ...]:
    keys = ("eos_token_id", "eot_token_id", "eom_token_id")
    ids = [meta.get(f"tokenizer.ggml.{k}") for k in keys]
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def _llama3_from_rope_freqs(
    reader: gguf.GGUFReader, tensor: Any, config: LlamaConfig
) -> RopeScaling:
    """The llama3 RoPE scaling whose per-frequency divisors equal the ``rope_freqs`` tensor."""
    from models.llama import rope_inv_freq

    divisors = np.asarray(tensor.data, np.float32).reshape(-1)
    base = np.asarray(rope_inv_freq(config.head_dim, config.rope_theta, None))
    original = GGUFMetadata(reader).get("llama.rope.scaling.original_context_length", 8192)
    for low, high in ((1.0, 4.0), (1.0, 2.0), (2.0, 4.0)):
        scaling = RopeScaling("llama3", float(divisors.max()), low, high, int(original))
        scaled = np.asarray(rope_inv_freq(config.head_dim, config.rope_theta, scaling))
        if divisors.shape == base.shape and np.allclose(base / scaled, divisors, rtol=1e-4):
            return scaling
    raise CheckpointError(
        f"tensor {ROPE_FREQS!r}: its frequency divisors match no llama3 RoPE scaling"
    )


def _tensor_ref(name: str, tensor: Any, config: LlamaConfig) -> tuple[str, TensorRef]:
    path, kind = _our_path(name, config)
    qtype = QType(tensor.tensor_type)
    if qtype not in SUPPORTED_TYPES:
        raise UnsupportedQuantizationError(
            f"tensor {name!r} is stored as {qtype.name}; supported types: "
            f"{', '.join(t.name for t in SUPPORTED_TYPES)}"
        )
    ne = tuple(int(d) for d in tensor.shape)  # fastest-varying first
    shape = tuple(reversed(ne)) if kind == "embedding" else ne
    heads = {"q": config.num_heads, "k": config.num_kv_heads}.get(kind)
    read = _reader(tensor, qtype, kind, heads)
    dtype = "float32" if qtype in QUANT_TYPES else _NUMPY_DTYPES[qtype].name
    return path, TensorRef(source=name, shape=shape, dtype=dtype, read=read)


def _our_path(name: str, config: LlamaConfig) -> tuple[str, str]:
    """Our parameter path and layout kind of a llama.cpp tensor name."""
    if name.endswith(".weight") and name[: -len(".weight")] in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[name[: -len(".weight")]]
    match = _LAYER_NAME.fullmatch(name)
    if match and match.group(2) in LAYER_TENSORS and int(match.group(1)) < config.num_layers:
        leaf, kind = LAYER_TENSORS[match.group(2)]
        return f"layers.{int(match.group(1))}.{leaf}", kind
    raise UnexpectedTensorError(
        f"tensor {name!r} in the GGUF file matches no parameter of a "
        f"{config.num_layers}-layer Llama model"
    )


_NUMPY_DTYPES: Mapping[QType, np.dtype] = {
    QType.F32: np.dtype(np.float32),
    QType.F16: np.dtype(np.float16),
    QType.BF16: np.dtype(ml_dtypes.bfloat16),
}


def _reader(tensor: Any, qtype: QType, kind: str, heads: int | None) -> Callable[[], np.ndarray]:
    """A function that reads the tensor into our layout (see the module docstring)."""
    rows_cols = tuple(reversed([int(d) for d in tensor.shape]))

    def read() -> np.ndarray:
        if qtype in _NUMPY_DTYPES:
            data = np.asarray(tensor.data).view(_NUMPY_DTYPES[qtype]).reshape(rows_cols)
        else:
            data = gguf.quants.dequantize(np.asarray(tensor.data), qtype).reshape(rows_cols)
        if kind in ("vector", "embedding"):
            return np.ascontiguousarray(data)
        if heads is not None:
            data = unpermute_rope_rows(data, heads)
        return np.ascontiguousarray(data.T)

    return read


def unpermute_rope_rows(w_oi: np.ndarray, num_heads: int) -> np.ndarray:  # [out, in]
    """Invert llama.cpp's Q/K row order: interleaved pairs back to rotate-half, per head.

    Within each head of ``D`` rows, GGUF row ``2i + j`` holds Hugging Face row ``j·D/2 + i``.
    """
    out, d_in = w_oi.shape
    if out % (2 * num_heads):
        raise CheckpointError(f"cannot split {out} rows into {num_heads} heads of even size")
    half = out // num_heads // 2
    return w_oi.reshape(num_heads, half, 2, d_in).swapaxes(1, 2).reshape(out, d_in)


def permute_rope_rows(w_oi: np.ndarray, num_heads: int) -> np.ndarray:  # [out, in]
    """llama.cpp's Q/K row order from the rotate-half one (the inverse of ``unpermute``)."""
    out, d_in = w_oi.shape
    half = out // num_heads // 2
    return w_oi.reshape(num_heads, 2, half, d_in).swapaxes(1, 2).reshape(out, d_in)


def _checkpoint_dtype(reader: gguf.GGUFReader) -> str:
    """``float16``/``bfloat16`` when every matrix is stored so, else ``float32``."""
    types = {QType(t.tensor_type) for t in reader.tensors if len(t.shape) > 1}
    if types == {QType.F16}:
        return "float16"
    if types == {QType.BF16}:
        return "bfloat16"
    return "float32"
