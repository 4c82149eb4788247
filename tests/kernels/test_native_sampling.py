"""The C++ greedy sampler (XLA FFI): the reference's tokens exactly and its log-probabilities to
float32 rounding, ties to the first maximum, NaN rows as jnp.argmax has them, ragged vocabulary
sizes, chosen on the CPU by ``greedy_sample``, a portable build without AVX2."""

from __future__ import annotations

import ctypes

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ligerjax.kernels import native_sampling as ns
from ligerjax.kernels.native_library import NativeBuild, flags_for
from ligerjax.kernels.native_sampling import (
    greedy_sample,
    greedy_sample_reference,
    native_greedy_sample,
)

pytestmark = pytest.mark.skipif(
    ns.sampling_unavailable_reason() is not None, reason=f"{ns.sampling_unavailable_reason()}"
)


def logits(rng, B, V, scale=5.0):
    x = rng.standard_normal((B, V)).astype(np.float32) * scale
    if B > 2 and V > 40:
        x[1, [7, 30, V - 1]] = x[1].max() + 1.0  # a three-way tie: the first wins
        x[2, : V // 2] = -np.inf  # masked half
    return jnp.asarray(x)


def assert_matches_reference(token_b, logprob_b, x):
    want_token, want_logprob = greedy_sample_reference(x)
    np.testing.assert_array_equal(np.asarray(token_b), np.asarray(want_token))
    np.testing.assert_allclose(
        np.asarray(logprob_b), np.asarray(want_logprob), rtol=2e-6, atol=2e-6
    )


@pytest.mark.parametrize("B,V", [(64, 49152), (5, 1000), (3, 17), (1, 1), (2, 15)])
def test_matches_the_reference(rng, B, V):
    x = logits(rng, B, V)
    assert_matches_reference(*jax.jit(native_greedy_sample)(x), x)


def test_ties_go_to_the_first_maximum_and_nan_rows_to_their_first_nan(rng):
    x = np.array(logits(rng, 4, 100))
    x[0] = 1.0  # all tied
    x[3, [11, 60]] = np.nan
    token_b, logprob_b = native_greedy_sample(jnp.asarray(x))
    assert np.asarray(token_b)[0] == 0 and np.asarray(token_b)[3] == 11
    assert np.isnan(np.asarray(logprob_b)[3]) and not np.isnan(np.asarray(logprob_b)[:3]).any()
    np.testing.assert_allclose(np.asarray(logprob_b)[0], -np.log(100), rtol=1e-6)
    assert np.asarray(jnp.argmax(jnp.asarray(x), axis=-1))[3] == 11


def test_greedy_sample_runs_the_kernel_on_the_cpu(rng):
    x = logits(rng, 8, 300)
    assert ns.TARGET in jax.jit(greedy_sample).lower(x).as_text()
    assert_matches_reference(*jax.jit(greedy_sample)(x), x)
    with pytest.raises(ValueError, match=r"float16\[8, 300\]"):
        greedy_sample(x.astype(jnp.float16))


def test_an_empty_batch(rng):
    token_b, logprob_b = native_greedy_sample(jnp.zeros((0, 10), jnp.float32))
    assert token_b.shape == (0,) and logprob_b.shape == (0,)


def test_the_portable_build_without_avx2_matches_too(rng, tmp_path):
    flags = flags_for(())
    library = ctypes.CDLL(str(NativeBuild(ns.SOURCE, "c++", tmp_path, flags=flags).build()))
    target = "ligerjax_test_portable_greedy_sample"
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(library.LigerjaxGreedySample), "cpu")
    x = logits(rng, 6, 1003)
    out_types = (jax.ShapeDtypeStruct((6,), jnp.int32), jax.ShapeDtypeStruct((6,), jnp.float32))
    assert_matches_reference(*jax.ffi.ffi_call(target, out_types)(x), x)
