"""The Llama model's rotary table: the same logits as angles computed on every call, a table
XLA reads instead of recomputing ``cos`` and ``sin`` in the layers, and weights left shared."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from models.llama import RotaryCache, RotaryTable, rope_angles, rope_inv_freq


def _logits(model, tokens_bt):
    return jax.jit(lambda m, t: m(t)[0])(model, tokens_bt)


@pytest.fixture(scope="module")
def tiny():
    cfg = models.LlamaConfig.preset("tiny")
    return cfg, models.Llama(cfg, rngs=nnx.Rngs(0))


def test_a_tabled_llama_computes_the_same_logits_over_the_same_weights(tiny):
    cfg, model = tiny
    tabled = model.with_rotary_table(64)
    assert model.rotary_table is None  # the model passed in is unchanged
    assert tabled.layers[0].self_attn.q_proj.kernel is model.layers[0].self_attn.q_proj.kernel
    tokens_bt = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 40)))
    np.testing.assert_allclose(
        np.asarray(_logits(tabled, tokens_bt)), np.asarray(_logits(model, tokens_bt)), atol=1e-5
    )


def test_the_table_holds_each_positions_angles_as_derived_state(tiny):
    cfg, _ = tiny
    table = RotaryTable(cfg, 300)
    positions_bt = jnp.asarray([[0, 1, 299], [17, 150, 2]], jnp.int32)
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    for got, want in zip(table(positions_bt), rope_angles(positions_bt, inv_freq), strict=True):
        assert got.shape == (2, 3, 1, cfg.head_dim // 2)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
    state = nnx.state(table)
    assert {
        type(v) for v in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    } == {RotaryCache}
    assert not jax.tree.leaves(nnx.state(table, nnx.Param))  # no checkpoint tensor for it


def test_the_compiled_tabled_model_computes_no_cosines(tiny):
    """The point of the table: XLA fuses ``cos`` into every layer's rotation otherwise."""
    cfg, model = tiny
    tokens_bt = jnp.zeros((1, 8), jnp.int32)

    def cosines(m) -> int:
        return (
            jax.jit(lambda m, t: m(t)[0]).lower(m, tokens_bt).compile().as_text().count("cosine(")
        )

    assert cosines(model) >= cfg.num_layers
    assert cosines(model.with_rotary_table(16)) == 0


def test_a_table_needs_a_position():
    with pytest.raises(ValueError, match="max_positions=0"):
        RotaryTable(models.LlamaConfig.preset("tiny"), 0)
