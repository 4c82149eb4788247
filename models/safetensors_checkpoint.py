"""Read a Hugging Face Llama directory (``config.json`` + safetensors) into a :class:`Checkpoint`.

The safetensors format is an 8-byte little-endian header length, a JSON header (name ->
dtype, shape, byte range) and the raw data; we memory-map the file and read the header
ourselves, which gives bfloat16 through ``ml_dtypes`` and lets a truncated file be caught
before any data is read. PyTorch ``weight``s are ``[out, in]``; our kernels are ``[in, out]``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from models.checkpoint import (
    Checkpoint,
    CheckpointError,
    MissingMetadataError,
    MissingTensorError,
    TensorRef,
    TruncatedCheckpointError,
    UnexpectedTensorError,
    UnknownArchitectureError,
    UnsupportedQuantizationError,
)
from models.config import LlamaConfig, RopeScaling

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama",)
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}
TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}

_LAYER_NAME = re.compile(
    r"model\.layers\.(\d+)\.((?:self_attn|mlp)\.\w+_proj|input_layernorm|post_attention_layernorm)"
    r"\.weight"
)
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def read_hf_directory(directory: str | os.PathLike[str]) -> Checkpoint:
    """Read ``config.json`` and ``model.safetensors`` (or its sharded index) of a HF Llama.

    Raises a :class:`CheckpointError` subclass naming the key or tensor for another
    ``model_type``, a missing shard tensor, an unknown tensor, a truncated file or an
    unsupported dtype.
    """
    directory = Path(directory)
    config_dict = _read_json(directory / "config.json")
    config = hf_config(config_dict, name=directory.name)
    refs: dict[str, TensorRef] = {}
    for name, ref in _raw_tensors(directory).items():
        path = _our_path(name, config)
        if path is None:
            continue
        refs[path] = _to_our_layout(ref, path)
    dtype = config_dict.get("dtype") or config_dict.get("torch_dtype") or "float32"
    return Checkpoint(config=config, tensors=refs, dtype=TORCH_DTYPES.get(dtype, "float32"))


def hf_config(config: dict[str, Any], *, name: str = "llama") -> LlamaConfig:
    """The :class:`LlamaConfig` of a Hugging Face ``config.json`` dictionary."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnknownArchitectureError(
            f"config.json model_type={model_type!r}: unsupported; this loader reads "
            f"{SUPPORTED_MODEL_TYPES}"
        )
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise CheckpointError(f"config.json {key}=true: biases are not supported")
    if config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"config.json hidden_act={config['hidden_act']!r}: need 'silu'")
    heads = _require(config, "num_attention_heads")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    eos = config.get("eos_token_id")
    return LlamaConfig(
        vocab_size=_require(config, "vocab_size"),
        hidden_size=_require(config, "hidden_size"),
        intermediate_size=_require(config, "intermediate_size"),
        num_layers=_require(config, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or 0,
        rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10_000.0))),
        rope_scaling=_rope_scaling(rope),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        bos_token_id=config.get("bos_token_id"),
        eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
        name=name,
    )


def _require(config: dict[str, Any], key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int):
        raise MissingMetadataError(f"config.json {key}={value!r}: expected an integer")
    return value


def _rope_scaling(rope: dict[str, Any]) -> RopeScaling | None:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return None
    if kind not in ("linear", "llama3"):
        raise CheckpointError(f"config.json rope_type={kind!r}: need default, linear or llama3")
    fields = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    extra = {k: rope[k] for k in fields if k in rope}
    return RopeScaling(rope_type=kind, factor=float(rope["factor"]), **extra)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def _raw_tensors(directory: Path) -> dict[str, TensorRef]:
    """Every tensor of the checkpoint under its file name, in the file's own layout."""
    if (directory / SINGLE_FILE).exists():
        return read_safetensors(directory / SINGLE_FILE)
    if not (directory / INDEX_FILE).exists():
        raise CheckpointError(f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE} is present")
    weight_map: dict[str, str] = _read_json(directory / INDEX_FILE).get("weight_map", {})
    tensors: dict[str, TensorRef] = {}
    for shard in sorted(set(weight_map.values())):
        tensors.update(read_safetensors(directory / shard))
    for name, shard in weight_map.items():
        if name not in tensors:
            raise MissingTensorError(
                f"tensor {name!r}: listed in {INDEX_FILE}, absent from {shard}"
            )
    return tensors


def read_safetensors(path: str | os.PathLike[str]) -> dict[str, TensorRef]:
    """The tensors of one ``.safetensors`` file, memory-mapped, read lazily."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise TruncatedCheckpointError(f"{path}: {size} bytes, shorter than a header")
        (header_len,) = struct.unpack("<Q", prefix)
        if 8 + header_len > size:
            raise TruncatedCheckpointError(
                f"{path}: header of {header_len} bytes runs past the end of the file ({size} bytes)"
            )
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    mm = np.memmap(path, dtype=np.uint8, mode="r") if size > data_start else None
    return {
        name: _safetensors_ref(path, name, info, mm, data_start, size)
        for name, info in header.items()
    }


def _safetensors_ref(
    path: Path, name: str, info: dict[str, Any], mm: Any, data_start: int, size: int
) -> TensorRef:
    if info["dtype"] not in DTYPES:
        raise UnsupportedQuantizationError(
            f"tensor {name!r} in {path.name} is stored as {info['dtype']}; "
            f"supported: {', '.join(DTYPES)}"
        )
    dtype, shape = DTYPES[info["dtype"]], tuple(int(d) for d in info["shape"])
    begin, end = (data_start + int(o) for o in info["data_offsets"])
    if end > size:
        raise TruncatedCheckpointError(
            f"tensor {name!r} needs bytes up to offset {end}, but {path.name} is {size} bytes "
            "long: truncated safetensors file"
        )
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise CheckpointError(f"tensor {name!r} in {path.name}: byte range does not fit {shape}")

    def read() -> np.ndarray:
        return np.asarray(mm[begin:end]).view(dtype).reshape(shape)

    return TensorRef(source=name, shape=shape, dtype=dtype.name, read=read)


def _our_path(name: str, config: LlamaConfig) -> str | None:
    """Our parameter path of a HF tensor name; None for tensors that are safely ignored."""
    if name == "model.embed_tokens.weight":
        return "embed_tokens.embedding"
    if name == "model.norm.weight":
        return "norm.weight"
    if name == "lm_head.weight":
        if config.tie_word_embeddings:
            logger.debug("ignoring lm_head.weight: the config ties it to the embeddings")
            return None
        return "lm_head.kernel"
    if _IGNORED.fullmatch(name):
        return None
    match = _LAYER_NAME.fullmatch(name)
    if match and int(match.group(1)) < config.num_layers:
        leaf = "kernel" if match.group(2).endswith("_proj") else "weight"
        return f"layers.{int(match.group(1))}.{match.group(2)}.{leaf}"
    raise UnexpectedTensorError(
        f"tensor {name!r} in the checkpoint matches no parameter of a "
        f"{config.num_layers}-layer Llama model"
    )


def _to_our_layout(ref: TensorRef, path: str) -> TensorRef:
    """Kernels are transposed (``[out, in]`` -> ``[in, out]``); everything else is kept."""
    if not path.endswith(".kernel"):
        return ref
    if len(ref.shape) != 2:
        raise CheckpointError(f"tensor {ref.source!r}: a matrix, got shape {ref.shape}")
    read: Callable[[], np.ndarray] = ref.read
    return TensorRef(
        source=ref.source,
        shape=ref.shape[::-1],
        dtype=ref.dtype,
        read=lambda: np.ascontiguousarray(read().T),
    )
