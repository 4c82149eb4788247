"""GGUF reading: dequantisation per type, llama.cpp's layout undone, config from metadata,
and a clear error for each kind of bad file."""

from __future__ import annotations

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from models import load
from models.checkpoint import (
    CheckpointError,
    MissingTensorError,
    ShapeMismatchError,
    TruncatedCheckpointError,
    UnexpectedTensorError,
    UnknownArchitectureError,
    UnsupportedQuantizationError,
)
from models.config import RopeScaling
from models.gguf_checkpoint import permute_rope_rows, read_gguf, unpermute_rope_rows
from models.llama import rope_inv_freq

QType = gguf.GGMLQuantizationType

# Worst-case |dequantised - original| per block of 32, as a multiple of the block's max |x|
# (half a quantisation step, a whole one where the format clamps the extreme value).
BLOCK_ERROR = {
    QType.Q8_0: 1 / 127,
    QType.Q4_0: 1 / 8,
    QType.Q4_1: 1 / 15,
    QType.Q5_0: 1 / 16,
    QType.Q5_1: 1 / 31,
}
FLOAT_RTOL = {QType.F32: 0.0, QType.F16: 2**-11, QType.BF16: 2**-8}


def _our_layout(name: str, w_oi: np.ndarray, config) -> np.ndarray:
    """What the reader should return for an HF-layout tensor (kernels [in, out])."""
    if w_oi.ndim == 1 or name == "model.embed_tokens.weight":
        return w_oi
    return w_oi.T


def _hf_to_our_paths(config) -> dict[str, str]:
    paths = {
        "model.embed_tokens.weight": "embed_tokens.embedding",
        "model.norm.weight": "norm.weight",
        "lm_head.weight": "lm_head.kernel",
    }
    for i in range(config.num_layers):
        for hf in ("q_proj", "k_proj", "v_proj", "o_proj"):
            paths[f"model.layers.{i}.self_attn.{hf}.weight"] = f"layers.{i}.self_attn.{hf}.kernel"
        for hf in ("gate_proj", "up_proj", "down_proj"):
            paths[f"model.layers.{i}.mlp.{hf}.weight"] = f"layers.{i}.mlp.{hf}.kernel"
        for hf in ("input_layernorm", "post_attention_layernorm"):
            paths[f"model.layers.{i}.{hf}.weight"] = f"layers.{i}.{hf}.weight"
    return paths


@pytest.mark.parametrize("qtype", [*FLOAT_RTOL, *BLOCK_ERROR], ids=lambda q: q.name)
def test_dequantises_each_type_within_its_tolerance(tmp_path, ckpt, qtype):
    config = ckpt.tiny_config(tie_word_embeddings=False)
    state = ckpt.random_hf_state(config, seed=1)
    path = ckpt.write_gguf(
        tmp_path / "m.gguf", config, ckpt.hf_to_gguf_tensors(state, config), qtype=qtype
    )
    checkpoint = read_gguf(path)
    arrays = checkpoint.arrays()
    paths = _hf_to_our_paths(config)
    assert set(arrays) == {paths[k] for k in state}
    for hf_name, original in state.items():
        got = arrays[paths[hf_name]]
        want = _our_layout(hf_name, original, config)
        assert got.shape == want.shape, hf_name
        if original.ndim == 1:
            np.testing.assert_array_equal(got, want, err_msg=hf_name)
        elif qtype in FLOAT_RTOL:
            np.testing.assert_allclose(
                got.astype(np.float32), want, rtol=FLOAT_RTOL[qtype], atol=6e-8, err_msg=hf_name
            )
        else:
            transposed = hf_name != "model.embed_tokens.weight"
            _assert_within_block_error(hf_name, original, got, want, BLOCK_ERROR[qtype], transposed)


def _assert_within_block_error(name, original_oi, got, want, factor, transposed):
    """Blocks of 32 run along the input axis of the torch-layout matrix."""
    blocks = np.abs(original_oi).reshape(original_oi.shape[0], -1, 32).max(-1, keepdims=True)
    bound_oi = np.broadcast_to(blocks, (*blocks.shape[:2], 32)).reshape(original_oi.shape)
    bound = bound_oi.T if transposed else bound_oi
    excess = np.abs(got - want) - (factor * 1.02 * bound + 1e-7)
    assert excess.max() <= 0, f"{name}: error beyond the quantisation bound by {excess.max()}"


@pytest.mark.parametrize("qtype", [QType.Q8_0, QType.Q4_1], ids=lambda q: q.name)
def test_dequantised_tensors_equal_gguf_round_trip_in_our_layout(tmp_path, ckpt, qtype):
    config = ckpt.tiny_config()
    state = ckpt.random_hf_state(config, seed=2)
    gguf_tensors = ckpt.hf_to_gguf_tensors(state, config)
    arrays = read_gguf(ckpt.write_gguf(tmp_path / "m.gguf", config, gguf_tensors, qtype=qtype))
    arrays = arrays.arrays()
    for name, heads, path in (
        ("blk.1.attn_q.weight", config.num_heads, "layers.1.self_attn.q_proj.kernel"),
        ("blk.1.attn_k.weight", config.num_kv_heads, "layers.1.self_attn.k_proj.kernel"),
        ("blk.0.ffn_down.weight", None, "layers.0.mlp.down_proj.kernel"),
    ):
        round_trip = gguf.quants.dequantize(gguf.quants.quantize(gguf_tensors[name], qtype), qtype)
        if heads is not None:
            round_trip = unpermute_rope_rows(round_trip, heads)
        np.testing.assert_array_equal(arrays[path], round_trip.T, err_msg=name)


def test_q6_k_blocks_dequantise_with_their_sub_block_scales(tmp_path, ckpt):
    """A Q6_K block (d, 16 int8 scales, 6-bit quants at 0): element i is d·scale[i//16]·(0-32)."""
    config = ckpt.tiny_config(hidden_size=256, num_heads=4, num_kv_heads=2)
    state = ckpt.random_hf_state(config)
    tensors = ckpt.hf_to_gguf_tensors(state, config)
    rows = config.intermediate_size
    block = np.zeros(210, np.uint8)  # ql[128], qh[64], scales[16], d (f16)
    block[192:208] = np.arange(1, 17, dtype=np.int8).view(np.uint8)
    block[208:210] = np.frombuffer(np.float16(1 / 32).tobytes(), np.uint8)
    tensors["blk.0.ffn_up.weight"] = np.tile(block, (rows, 1))
    path = ckpt.write_gguf(
        tmp_path / "k.gguf", config, tensors, types={"blk.0.ffn_up.weight": QType.Q6_K}
    )
    up = read_gguf(path).tensors["layers.0.mlp.up_proj.kernel"].load()
    column = -(np.arange(256) // 16 + 1).astype(np.float32)
    np.testing.assert_array_equal(up, np.tile(column[:, None], (1, rows)))


@pytest.mark.parametrize("qtype", [QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K])
def test_other_k_quants_read_at_the_listed_shape(tmp_path, ckpt, qtype):
    config = ckpt.tiny_config(hidden_size=256, num_heads=4, num_kv_heads=2)
    tensors = ckpt.hf_to_gguf_tensors(ckpt.random_hf_state(config), config)
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    tensors["blk.0.ffn_up.weight"] = np.zeros((config.intermediate_size, block_bytes), np.uint8)
    path = ckpt.write_gguf(
        tmp_path / "k.gguf", config, tensors, types={"blk.0.ffn_up.weight": qtype}
    )
    up = read_gguf(path).tensors["layers.0.mlp.up_proj.kernel"].load()
    np.testing.assert_array_equal(up, np.zeros((256, config.intermediate_size), np.float32))


def test_rope_row_permutation_matches_llama_cpp_on_a_literal_head():
    # one head, D=4: rotate-half rows [x0, x1, y0, y1] are stored interleaved [x0, y0, x1, y1]
    w_oi = np.array([[0.0], [1.0], [2.0], [3.0]])
    np.testing.assert_array_equal(permute_rope_rows(w_oi, 1)[:, 0], [0, 2, 1, 3])
    np.testing.assert_array_equal(unpermute_rope_rows(permute_rope_rows(w_oi, 1), 1), w_oi)


def test_rope_row_permutation_round_trips_per_head():
    w_oi = np.random.default_rng(0).standard_normal((3 * 8, 5))
    stored = permute_rope_rows(w_oi, 3)
    assert not np.array_equal(stored, w_oi)
    np.testing.assert_array_equal(unpermute_rope_rows(stored, 3), w_oi)
    np.testing.assert_array_equal(stored[8:16], permute_rope_rows(w_oi[8:16], 1))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_gguf_model_matches_transformers_logits(tmp_path, ckpt, tied):
    config = ckpt.tiny_config(tie_word_embeddings=tied)
    state = ckpt.random_hf_state(config, seed=3)
    path = ckpt.write_gguf(tmp_path / "m.gguf", config, ckpt.hf_to_gguf_tensors(state, config))
    model, _tokenizer, loaded = load(path)
    assert loaded.tie_word_embeddings is tied
    assert (model.lm_head is None) is tied
    tokens_bt = np.random.default_rng(0).integers(0, config.vocab_size, (2, 11))
    ours = np.asarray(model(jnp.asarray(tokens_bt, jnp.int32))[0])
    theirs = ckpt.torch_logits(ckpt.torch_llama(config, state), tokens_bt)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_config_comes_from_metadata(tmp_path, ckpt):
    config = ckpt.tiny_config(
        num_kv_heads=1, rms_norm_eps=1e-5, max_position_embeddings=96, tie_word_embeddings=True
    )

    def metadata(writer: gguf.GGUFWriter) -> None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(2.0)
        writer.add_eot_token_id(1)

    tensors = ckpt.hf_to_gguf_tensors(ckpt.random_hf_state(config), config)
    path = ckpt.write_gguf(tmp_path / "m.gguf", config, tensors, extra_metadata=metadata)
    got = read_gguf(path).config
    assert (got.num_layers, got.hidden_size, got.intermediate_size) == (2, 64, 96)
    assert (got.num_heads, got.num_kv_heads, got.head_dim) == (4, 1, 16)
    assert got.vocab_size == len(ckpt.tiny_vocab()[0])
    assert got.max_position_embeddings == 96
    assert got.rms_norm_eps == pytest.approx(1e-5)
    assert got.rope_scaling == RopeScaling(rope_type="linear", factor=2.0)
    assert got.bos_token_id == 0 and got.eos_token_ids == (2, 1)
    assert got.tie_word_embeddings


def test_llama3_rope_scaling_is_recovered_from_rope_freqs(tmp_path, ckpt):
    config = ckpt.tiny_config()
    scaling = RopeScaling("llama3", 8.0, 1.0, 4.0, 64)
    divisors = np.asarray(rope_inv_freq(16, config.rope_theta, None)) / np.asarray(
        rope_inv_freq(16, config.rope_theta, scaling)
    )
    assert divisors.min() == pytest.approx(1.0) and divisors.max() == pytest.approx(8.0)
    tensors = ckpt.hf_to_gguf_tensors(ckpt.random_hf_state(config), config)
    tensors["rope_freqs.weight"] = divisors.astype(np.float32)

    def metadata(writer: gguf.GGUFWriter) -> None:
        writer.add_rope_scaling_orig_ctx_len(64)

    path = ckpt.write_gguf(tmp_path / "m.gguf", config, tensors, extra_metadata=metadata)
    got = read_gguf(path).config.rope_scaling
    assert got.rope_type == "llama3" and got.factor == pytest.approx(8.0)
    assert (got.low_freq_factor, got.high_freq_factor) == (1.0, 4.0)
    assert got.original_max_position_embeddings == 64


# ---- bad files -----------------------------------------------------------------------------


@pytest.fixture
def tiny_gguf(tmp_path, ckpt):
    """(config, GGUF-layout tensors, write(tensors, **kw) -> path) of a valid tiny model."""
    config = ckpt.tiny_config()
    tensors = ckpt.hf_to_gguf_tensors(ckpt.random_hf_state(config), config)

    def write(tensors, **kwargs):
        return ckpt.write_gguf(tmp_path / "bad.gguf", config, tensors, **kwargs)

    return config, tensors, write


def test_unknown_architecture_is_named(tiny_gguf):
    _, tensors, write = tiny_gguf
    with pytest.raises(UnknownArchitectureError, match=r"general\.architecture='gpt2'"):
        load(write(tensors, arch="gpt2"))


def test_missing_tensor_is_named(tiny_gguf):
    _, tensors, write = tiny_gguf
    del tensors["blk.1.ffn_up.weight"]
    with pytest.raises(MissingTensorError, match=r"lacks .*'layers\.1\.mlp\.up_proj\.kernel'"):
        load(write(tensors))


def test_extra_tensor_is_named(tiny_gguf):
    _, tensors, write = tiny_gguf
    tensors["blk.0.attn_q.bias"] = np.zeros(64, np.float32)
    with pytest.raises(UnexpectedTensorError, match=r"'blk\.0\.attn_q\.bias'"):
        load(write(tensors))


def test_tensor_of_a_layer_beyond_block_count_is_unexpected(tiny_gguf):
    _, tensors, write = tiny_gguf
    tensors["blk.2.ffn_norm.weight"] = np.ones(64, np.float32)
    with pytest.raises(UnexpectedTensorError, match=r"'blk\.2\.ffn_norm\.weight'.*2-layer"):
        load(write(tensors))


def test_shape_mismatch_names_tensor_and_both_shapes(tiny_gguf):
    _, tensors, write = tiny_gguf
    tensors["blk.0.ffn_up.weight"] = np.zeros((64, 64), np.float32)
    with pytest.raises(
        ShapeMismatchError,
        match=r"'blk\.0\.ffn_up\.weight'.*expected shape \(64, 96\), got \(64, 64\)",
    ):
        load(write(tensors))


def test_truncated_file_names_the_cut_tensor(tiny_gguf):
    _, tensors, write = tiny_gguf
    path = write(tensors)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(TruncatedCheckpointError, match=r"tensor '.+' needs bytes .* truncated"):
        load(path)


def test_unsupported_quantisation_type_is_named(tiny_gguf):
    _, tensors, write = tiny_gguf
    rows, cols = tensors["blk.0.ffn_gate.weight"].shape
    block_bytes = gguf.GGML_QUANT_SIZES[QType.Q8_1][1]
    tensors["blk.0.ffn_gate.weight"] = np.zeros((rows, cols // 32 * block_bytes), np.uint8)
    path = write(tensors, types={"blk.0.ffn_gate.weight": QType.Q8_1})
    with pytest.raises(UnsupportedQuantizationError, match=r"'blk\.0\.ffn_gate\.weight'.*Q8_1"):
        load(path)


def test_not_a_gguf_file_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"this is not a gguf file at all" * 4)
    with pytest.raises(CheckpointError, match="GGUF header"):
        load(path)
