"""Hugging Face directories written by Transformers load and match its logits; bad ones fail
with an error naming the tensor or key."""

from __future__ import annotations

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from models import load
from models.checkpoint import (
    MissingTensorError,
    ShapeMismatchError,
    TruncatedCheckpointError,
    UnexpectedTensorError,
    UnknownArchitectureError,
    UnsupportedQuantizationError,
)
from models.config import RopeScaling
from models.safetensors_checkpoint import hf_config, read_hf_directory

VARIANTS = {
    "gqa-untied": {},
    "tied": {"tie_word_embeddings": True},
    "llama3-rope": {"rope_scaling": RopeScaling("llama3", 8.0, 1.0, 4.0, 32)},
    "linear-rope": {"rope_scaling": RopeScaling("linear", 4.0)},
    "head-dim-32": {"head_dim": 32, "num_kv_heads": 1},
}


def _save(tmp_path, ckpt, *, seed=0, max_shard_size=None, dtype=None, **overrides):
    """Save a random Transformers Llama with the tiny tokenizer; return (dir, config, model)."""
    config = ckpt.tiny_config(**overrides)
    model = ckpt.torch_llama(config, ckpt.random_hf_state(config, seed=seed))
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(tmp_path, **kwargs)
    ckpt.write_hf_tokenizer(tmp_path)
    return tmp_path, config, model


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_transformers_checkpoint_matches_its_logits(tmp_path, ckpt, variant):
    directory, config, hf_model = _save(tmp_path, ckpt, **VARIANTS[variant])
    model, _tokenizer, loaded = load(directory)
    assert loaded.rope_scaling == config.rope_scaling
    assert loaded.tie_word_embeddings == config.tie_word_embeddings
    assert loaded.head_dim == config.head_dim
    tokens_bt = np.random.default_rng(1).integers(0, config.vocab_size, (2, 40))
    ours = np.asarray(model(jnp.asarray(tokens_bt, jnp.int32))[0])
    np.testing.assert_allclose(ours, ckpt.torch_logits(hf_model, tokens_bt), rtol=1e-4, atol=1e-4)


def test_sharded_checkpoint_loads_the_same_weights(tmp_path, ckpt):
    single, _config, hf_model = _save(tmp_path / "single", ckpt, seed=4)
    sharded, *_ = _save(tmp_path / "sharded", ckpt, seed=4, max_shard_size="40KB")
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    assert not (sharded / "model.safetensors").exists()
    a = read_hf_directory(single).arrays()
    b = read_hf_directory(sharded).arrays()
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(a[path], b[path], err_msg=path)
    model, *_ = load(sharded)
    tokens_bt = np.arange(24).reshape(2, 12)
    ours = np.asarray(model(jnp.asarray(tokens_bt, jnp.int32))[0])
    np.testing.assert_allclose(ours, ckpt.torch_logits(hf_model, tokens_bt), rtol=1e-4, atol=1e-4)


def test_bfloat16_checkpoint_loads_exactly_with_dtype_auto(tmp_path, ckpt):
    import torch

    directory, _, hf_model = _save(tmp_path, ckpt, dtype=torch.bfloat16)
    model, _, config = load(directory, dtype="auto")
    assert config.dtype == "bfloat16"
    kernel = np.asarray(model.layers[1].mlp.up_proj.kernel[...])
    assert kernel.dtype == ml_dtypes.bfloat16
    torch_weight = hf_model.model.layers[1].mlp.up_proj.weight.detach().float().numpy()
    np.testing.assert_array_equal(kernel.astype(np.float32), torch_weight.T)


def test_eos_list_and_tokenizer_come_through(tmp_path, ckpt):
    directory, *_ = _save(tmp_path, ckpt, eos_token_ids=(2, 1))
    _, tokenizer, config = load(directory)
    assert config.eos_token_ids == (2, 1)
    assert tokenizer.eos_token_ids == (2, 1)
    assert tokenizer.bos_token_id == 0
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.encode(text)[:1] == [1]


def test_older_config_keys_are_understood():
    config = hf_config(
        {
            "model_type": "llama",
            "vocab_size": 32,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "rope_theta": 500000.0,
            "rope_scaling": {"type": "linear", "factor": 2.0},
            "eos_token_id": [5, 6],
            "head_dim": None,
            "torch_dtype": "bfloat16",
        }
    )
    assert config.num_kv_heads == 2 and config.head_dim == 8
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == RopeScaling("linear", 2.0)
    assert config.eos_token_ids == (5, 6)


# ---- bad directories -----------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path, ckpt):
    directory, *_ = _save(tmp_path, ckpt)
    return directory


def _edit_config(directory, **changes):
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _edit_tensors(directory, edit):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_unknown_model_type_is_named(saved):
    _edit_config(saved, model_type="gpt2")
    with pytest.raises(UnknownArchitectureError, match=r"model_type='gpt2'"):
        load(saved)


def test_missing_tensor_is_named(saved):
    _edit_tensors(saved, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(MissingTensorError, match=r"'layers\.1\.mlp\.up_proj\.kernel'"):
        load(saved)


def test_extra_tensor_is_named(saved):
    def add_bias(tensors):
        tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)

    _edit_tensors(saved, add_bias)
    with pytest.raises(UnexpectedTensorError, match=r"'model\.layers\.0\.self_attn\.q_proj\.bias'"):
        load(saved)


def test_shape_mismatch_names_tensor_and_both_shapes(saved):
    _edit_config(saved, intermediate_size=128)
    with pytest.raises(
        ShapeMismatchError,
        match=r"'model\.layers\.0\.mlp\.\w+_proj\.weight'.*expected shape \(\d+, \d+\), got",
    ):
        load(saved)


def test_truncated_file_names_the_cut_tensor(saved):
    path = saved / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-500])
    with pytest.raises(TruncatedCheckpointError, match=r"tensor '.+' needs bytes .* truncated"):
        load(saved)


def test_unsupported_dtype_is_named(saved):
    def quantise(tensors):
        tensors["model.layers.0.mlp.up_proj.weight"] = np.zeros((96, 64), np.int8)

    _edit_tensors(saved, quantise)
    with pytest.raises(UnsupportedQuantizationError, match=r"'model\.layers\.0\.mlp\.up_proj.*I8"):
        load(saved)


def test_shard_missing_a_listed_tensor_is_named(tmp_path, ckpt):
    directory, *_ = _save(tmp_path, ckpt, max_shard_size="40KB")
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    name = "model.layers.1.self_attn.o_proj.weight"
    shard = directory / index["weight_map"][name]
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard)
    with pytest.raises(MissingTensorError, match=rf"'{name}'.*absent from"):
        load(directory)
