"""The Llama family in Flax NNX: GQA/MQA, RoPE, RMSNorm, SwiGLU, optional tied embeddings.

Parameter paths follow Hugging Face names (``layers.3.self_attn.q_proj.kernel``) so that
checkpoint loaders and tensor-parallel partition rules can match them. ``nnx.Linear``
kernels are ``[in, out]`` (the transpose of a PyTorch ``weight``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import LlamaConfig, RopeScaling
from models.kv_cache import KVCache, NoCache


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> jax.Array:
    """Inverse frequencies ``[D/2]`` of rotary embeddings, after linear/llama3 scaling."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None or scaling.rope_type == "default":
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # llama3: long wavelengths scaled by `factor`, short ones kept, a smooth blend between.
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_medium, blended, scaled)


def _inv_freq(config: LlamaConfig) -> jax.Array:  # [D/2]
    return rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)


def rope_angles(
    positions_bt: jax.Array,  # [B, T] int32
    inv_freq: jax.Array,  # [D/2]
) -> tuple[jax.Array, jax.Array]:  # cos, sin: [B, T, 1, D/2]
    """Cosines and sines of every token's rotary angles."""
    angles_btf = positions_bt.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles_btf)[:, :, None, :], jnp.sin(angles_btf)[:, :, None, :]


class RotaryCache(nnx.Variable):
    """Rotary cosines and sines tabulated from the config: derived, never loaded."""


class RotaryTable(nnx.Module):
    """The rotary cosines and sines of positions ``[0, max_positions)``, computed once.

    XLA:CPU fuses ``cos`` and ``sin`` into every layer's rotation of q and k and so evaluates
    them again for each head of each layer (its optimization barriers are gone before fusion);
    a gather from a table costs a load per element instead."""

    def __init__(self, config: LlamaConfig, max_positions: int):
        if max_positions < 1:
            raise ValueError(f"RotaryTable: max_positions={max_positions} must be >= 1")
        positions_1s = jnp.arange(max_positions, dtype=jnp.int32)[None]
        cos_1s1f, sin_1s1f = rope_angles(positions_1s, _inv_freq(config))
        self.cos_sf = RotaryCache(cos_1s1f[0, :, 0])  # [S, D/2]: a context's positions
        self.sin_sf = RotaryCache(sin_1s1f[0, :, 0])  # [S, D/2]

    def __call__(self, positions_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
        """cos, sin ``[B, T, 1, D/2]`` of positions below ``max_positions`` (others clamp)."""
        cos_btf = self.cos_sf[...][positions_bt]
        sin_btf = self.sin_sf[...][positions_bt]
        return cos_btf[:, :, None], sin_btf[:, :, None]


def apply_rope(
    x_bthd: jax.Array,  # [B, T, H, D]
    cos_bt1f: jax.Array,  # [B, T, 1, D/2]
    sin_bt1f: jax.Array,  # [B, T, 1, D/2]
) -> jax.Array:  # [B, T, H, D]
    """Rotate-half RoPE (Hugging Face layout: first and second halves of D pair up)."""
    x = x_bthd.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos_bt1f - x2 * sin_bt1f, x2 * cos_bt1f + x1 * sin_bt1f], axis=-1)
    return out.astype(x_bthd.dtype)


class RMSNorm(nnx.Module):
    """``x / rms(x) * weight``, computed in f32."""

    def __init__(self, dim: int, *, eps: float, dtype: jnp.dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x_bte: jax.Array) -> jax.Array:
        x = x_bte.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * self.weight[...].astype(jnp.float32)).astype(x_bte.dtype)


def _linear(d_in: int, d_out: int, cfg: LlamaConfig, rngs: nnx.Rngs) -> nnx.Linear:
    dtype = jnp.dtype(cfg.dtype)
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=False,
        dtype=dtype,
        param_dtype=dtype,
        kernel_init=nnx.initializers.normal(0.02),
        rngs=rngs,
    )


class Attention(nnx.Module):
    """Grouped-query self-attention; K/V go through the cache, attention through ops."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_proj = _linear(cfg.hidden_size, cfg.q_size, cfg, rngs)
        self.k_proj = _linear(cfg.hidden_size, cfg.kv_size, cfg, rngs)
        self.v_proj = _linear(cfg.hidden_size, cfg.kv_size, cfg, rngs)
        self.o_proj = _linear(cfg.q_size, cfg.hidden_size, cfg, rngs)

    def __call__(self, x_bte, positions_bt, rope, cache: KVCache, layer: int):
        B, T, _ = x_bte.shape
        q_bthd = self.q_proj(x_bte).reshape(B, T, self.num_heads, self.head_dim)
        k_btkd = self.k_proj(x_bte).reshape(B, T, self.num_kv_heads, self.head_dim)
        v_btkd = self.v_proj(x_bte).reshape(B, T, self.num_kv_heads, self.head_dim)
        q_bthd = apply_rope(q_bthd, *rope)
        k_btkd = apply_rope(k_btkd, *rope)
        o_bthd, cache = cache.attend(layer, q_bthd, k_btkd, v_btkd, positions_bt)
        return self.o_proj(o_bthd.reshape(B, T, -1)), cache


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.gate_proj = _linear(cfg.hidden_size, cfg.intermediate_size, cfg, rngs)
        self.up_proj = _linear(cfg.hidden_size, cfg.intermediate_size, cfg, rngs)
        self.down_proj = _linear(cfg.intermediate_size, cfg.hidden_size, cfg, rngs)

    def __call__(self, x_bte: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x_bte)) * self.up_proj(x_bte))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x_bte, positions_bt, rope, cache: KVCache, layer: int):
        h_bte, cache = self.self_attn(self.input_layernorm(x_bte), positions_bt, rope, cache, layer)
        x_bte = x_bte + h_bte
        x_bte = x_bte + self.mlp(self.post_attention_layernorm(x_bte))
        return x_bte, cache


class Llama(nnx.Module):
    """A Llama-family causal LM.

    ``model(tokens_bt, positions_bt, cache) -> (logits_btv, cache)``; the cache is a pytree
    passed in and returned (``DenseKVCache`` for batched generation, ``NoCache`` for a whole
    sequence starting at position 0). Logits are f32.
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = jnp.dtype(config.dtype)
        self.embed_tokens = nnx.Embed(
            config.vocab_size,
            config.hidden_size,
            dtype=dtype,
            param_dtype=dtype,
            embedding_init=nnx.initializers.normal(0.02),
            rngs=rngs,
        )
        self.layers = nnx.List([DecoderLayer(config, rngs=rngs) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else _linear(config.hidden_size, config.vocab_size, config, rngs)
        )
        self.rotary_table: RotaryTable | None = nnx.data(None)  # set by with_rotary_table

    def with_rotary_table(self, max_positions: int) -> Llama:
        """A copy of this model (sharing its weights) that reads its rotary cosines and sines
        from a :class:`RotaryTable` of positions ``[0, max_positions)`` instead of computing
        them on every call: for serving, where positions stay below the context length."""
        graphdef, state = nnx.split(self)
        tabled = nnx.merge(graphdef, state)  # new modules over the same arrays
        tabled.rotary_table = RotaryTable(self.config, max_positions)
        return tabled

    def hidden_states(
        self,
        tokens_bt: jax.Array,  # [B, T] int32
        positions_bt: jax.Array,  # [B, T] int32
        cache: KVCache,
    ) -> tuple[jax.Array, KVCache]:  # [B, T, E]
        """Final-norm hidden states of every token, and the updated cache."""
        if self.rotary_table is not None:
            rope = self.rotary_table(positions_bt)
        else:
            rope = rope_angles(positions_bt, _inv_freq(self.config))
        x_bte = self.embed_tokens(tokens_bt)
        for i, layer in enumerate(self.layers):
            x_bte, cache = layer(x_bte, positions_bt, rope, cache, i)
        return self.norm(x_bte), cache

    def logits(self, h_bte: jax.Array) -> jax.Array:  # [..., V] f32
        """Vocabulary logits of hidden states (through the tied embedding if there is no head)."""
        if self.lm_head is None:
            return self.embed_tokens.attend(h_bte).astype(jnp.float32)
        return self.lm_head(h_bte).astype(jnp.float32)

    def __call__(
        self,
        tokens_bt: jax.Array,  # [B, T] int32
        positions_bt: jax.Array | None = None,  # [B, T] int32
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache]:  # [B, T, V]
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(
                jnp.arange(tokens_bt.shape[1], dtype=jnp.int32), tokens_bt.shape
            )
        h_bte, cache = self.hidden_states(
            tokens_bt, positions_bt, cache if cache is not None else NoCache()
        )
        return self.logits(h_bte), cache
