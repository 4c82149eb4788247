"""What every checkpoint reader returns, and the errors a bad checkpoint raises.

A reader turns a file into a :class:`Checkpoint`: the model's :class:`LlamaConfig` and one
:class:`TensorRef` per parameter, keyed by our parameter path (``layers.3.mlp.up_proj.kernel``)
and already in our layout (``[in, out]`` kernels, Hugging Face rotate-half Q/K rows). A ref
knows its shape without reading the data, so a loader can check every shape before it
dequantises a single byte, and can read one tensor at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from models.config import LlamaConfig


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file, tensor or key."""


class UnknownArchitectureError(CheckpointError):
    """The checkpoint is not of the Llama family (``general.architecture``, ``model_type``)."""


class MissingTensorError(CheckpointError):
    """The model has a parameter that the checkpoint lacks."""


class UnexpectedTensorError(CheckpointError):
    """The checkpoint holds a tensor that no parameter of the model takes."""


class ShapeMismatchError(CheckpointError):
    """A tensor's shape differs from its parameter's."""


class TruncatedCheckpointError(CheckpointError):
    """The file ends before the data its header promises."""


class UnsupportedQuantizationError(CheckpointError):
    """A tensor is stored in a type this reader cannot dequantise."""


class MissingMetadataError(CheckpointError):
    """A metadata key or config field the model needs is absent or malformed."""


@dataclass(frozen=True)
class TensorRef:
    """One parameter in a checkpoint: its shape (our layout) and how to read it.

    ``source`` is the tensor's name in the file, for error messages; ``read()`` returns a
    numpy array of shape ``shape`` (f32 for quantised tensors, else the stored dtype).
    """

    source: str
    shape: tuple[int, ...]
    dtype: str
    read: Callable[[], np.ndarray] = field(repr=False, compare=False)

    def load(self) -> np.ndarray:
        """Read the data and check it came out at the promised shape."""
        array = self.read()
        if tuple(array.shape) != self.shape:
            raise ShapeMismatchError(
                f"tensor {self.source!r}: read shape {tuple(array.shape)}, header says {self.shape}"
            )
        return array


@dataclass(frozen=True)
class Checkpoint:
    """A model's config and its tensors, keyed by our parameter paths.

    ``dtype`` is the checkpoint's own floating type (``float32``/``bfloat16``/``float16``), the
    one ``load(..., dtype="auto")`` picks; quantised GGUF files report ``float32``.
    """

    config: LlamaConfig
    tensors: Mapping[str, TensorRef]
    dtype: str = "float32"

    def arrays(self) -> dict[str, np.ndarray]:
        """Every tensor read into memory (dequantised), keyed by parameter path."""
        return {path: ref.load() for path, ref in self.tensors.items()}


def layer_param_path(layer: int, module: str, leaf: str) -> str:
    """``layers.{layer}.{module}.{leaf}``, the NNX path of one decoder-layer parameter."""
    return f"layers.{layer}.{module}.{leaf}"
