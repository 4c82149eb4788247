"""Model configuration: one frozen dataclass for the Llama family, with presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

RopeType = Literal["default", "linear", "llama3"]
DType = Literal["float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (Hugging Face's ``rope_scaling`` entry).

    ``linear`` divides every frequency by ``factor``; ``llama3`` scales only the low
    frequencies, blending smoothly between ``low_freq_factor`` and ``high_freq_factor``.
    """

    rope_type: RopeType = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ("default", "linear", "llama3"):
            raise ValueError(
                f"rope_scaling.rope_type={self.rope_type!r}: "
                "expected 'default', 'linear' or 'llama3'"
            )
        if self.factor <= 0:
            raise ValueError(f"rope_scaling.factor={self.factor}: must be > 0")
        if self.rope_type == "llama3" and not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(
                f"rope_scaling: need 0 < low_freq_factor ({self.low_freq_factor}) < "
                f"high_freq_factor ({self.high_freq_factor})"
            )


@dataclass(frozen=True)
class LlamaConfig:
    """Shape and numerics of a Llama-family decoder (GQA/MQA, RoPE, RMSNorm, SwiGLU).

    Letters used in shapes: E = ``hidden_size``, F = ``intermediate_size``,
    H = ``num_heads``, K = ``num_kv_heads``, D = ``head_dim``, V = ``vocab_size``.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0: hidden_size // num_heads
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: DType = "float32"
    name: str = "llama"

    def __post_init__(self) -> None:
        for field in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "max_position_embeddings",
        ):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LlamaConfig.{field}={value!r}: must be a positive int")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LlamaConfig.num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"LlamaConfig.hidden_size={self.hidden_size} is not divisible by "
                    f"num_heads={self.num_heads}; give head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim={self.head_dim}: must be positive and even")
        if self.rope_theta <= 0:
            raise ValueError(f"LlamaConfig.rope_theta={self.rope_theta}: must be > 0")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"LlamaConfig.rms_norm_eps={self.rms_norm_eps}: must be > 0")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"LlamaConfig.dtype={self.dtype!r}: expected float32/bfloat16/float16")
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> LlamaConfig:
        """A named configuration: ``tiny`` (tests), ``smollm2-135m`` or ``llama2-7b`` (its
        shape, bf16: for compile-only studies with abstract weights)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def replace(self, **changes: Any) -> LlamaConfig:
        return dataclasses.replace(self, **changes)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


PRESETS: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=256,
        name="tiny",
    ),
    "smollm2-135m": LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        rope_theta=100_000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
        bos_token_id=1,
        eos_token_ids=(2,),
        name="smollm2-135m",
    ),
    "llama2-7b": LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        max_position_embeddings=4096,
        dtype="bfloat16",
        name="llama2-7b",
    ),
}
