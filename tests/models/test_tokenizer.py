"""The tokenizer: the real SmolLM2 one against Transformers' conversion of the same GGUF,
llama.cpp's pre-tokenizer, round trips, chat templates and special tokens."""

from __future__ import annotations

import unicodedata

import jinja2
import pytest
import tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import pre_tokenizers

from models.gguf_checkpoint import read_gguf
from models.tokenizer import ChatTemplateError, Tokenizer, byte_level_bpe

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "In 2024 the price rose 12.5% to $1,234,567.89 (vs 987654 in 1999).",
    "Café, naïve, Zürich, Ελληνικά, русский, 日本語, 한국어, emoji 😀🚀 and ü-umlaut",
    "  leading spaces,\ttabs,\n\n\nnewlines and trailing spaces   ",
    "don't won't I'll we're they've she'd it's",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name three primes."},
        {"role": "assistant", "content": "2, 3, 5."},
        {"role": "user", "content": "And the next one? Ünïcödé ✓"},
    ],
]


@pytest.mark.parametrize("text", PROMPTS, ids=range(len(PROMPTS)))
def test_smollm2_ids_equal_transformers(smollm2_tokenizer, hf_smollm2_tokenizer, text):
    ours = smollm2_tokenizer.encode(text)
    assert ours == hf_smollm2_tokenizer(text)["input_ids"]
    assert smollm2_tokenizer.decode(ours, skip_special_tokens=False) == text


def test_chat_templated_prompt_ids_equal_transformers(smollm2_tokenizer, hf_smollm2_tokenizer):
    messages = CONVERSATIONS[1]
    text = smollm2_tokenizer.apply_chat_template(messages)
    ids = hf_smollm2_tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert smollm2_tokenizer.encode(text) == list(ids)


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["one-turn", "multi-turn"])
def test_chat_template_renders_like_transformers(
    smollm2_tokenizer, hf_smollm2_tokenizer, messages, generation_prompt
):
    ours = smollm2_tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    theirs = hf_smollm2_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )
    assert ours == theirs


def test_smollm2_special_ids_and_sizes(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert tok.vocab_size == 49152
    assert tok.bos_token_id == 1 and tok.eos_token_ids == (2,)
    assert tok.is_special(2) and tok.is_special(0) and not tok.is_special(tok.encode("cat")[0])
    assert tok.encode("Hello")[0] != tok.bos_token_id  # add_bos_token is false in the file


def test_special_tokens_are_matched_whole_and_skipped_on_decode(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode("<|im_start|>hi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert smollm2_tokenizer.decode(ids) == "hi"
    assert smollm2_tokenizer.decode(ids, skip_special_tokens=False) == "<|im_start|>hi<|im_end|>"


def test_smollm_pre_tokenizer_splits_each_digit_like_llama_cpp(smollm2_tokenizer):
    pieces = smollm2_tokenizer.backend.pre_tokenizer.pre_tokenize_str("x 123 ½ it's")
    assert [p for p, _ in pieces] == ["x", "Ġ", "1", "2", "3", "Ġ", "Â½", "Ġit", "'s"]


# SmolLM2's vocabulary lacks the byte tokens of 0x04 0x06 0x13 0x14 0x16 0x1d and of the
# UTF-8 lead bytes 0xf1-0xff (code points from U+40000): BPE drops those bytes, in llama.cpp
# and Transformers alike, so text holding them cannot round-trip.
ROUND_TRIP_CHARS = st.characters(
    codec="utf-8", max_codepoint=0x3FFFF, exclude_characters="\x04\x06\x13\x14\x16\x1d"
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.text(ROUND_TRIP_CHARS, max_size=80))
def test_decode_inverts_encode(smollm2_tokenizer, text):
    assert smollm2_tokenizer.decode(smollm2_tokenizer.encode(text), False) == text


def _no_known_divergence(text: str) -> bool:
    """Transformers converts the GGUF tokenizer with GPT-2's split alone; llama.cpp (and we,
    and SmolLM2's own tokenizer.json) first cut before every \\p{N} character, so GPT-2's
    whitespace look-ahead cannot see the digit. Ids differ only where a number follows two
    or more whitespace characters, or a non-ASCII number merges with a space (" ½")."""
    for i, c in enumerate(text):
        after_spaces = i >= 2 and text[i - 1].isspace() and text[i - 2].isspace()
        if unicodedata.category(c).startswith("N") and (not c.isascii() or after_spaces):
            return False
    return True


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.text(st.characters(codec="utf-8"), max_size=60).filter(_no_known_divergence))
def test_ids_equal_transformers_on_random_text(smollm2_tokenizer, hf_smollm2_tokenizer, text):
    assert smollm2_tokenizer.encode(text) == hf_smollm2_tokenizer(text)["input_ids"]


@pytest.fixture(scope="module")
def digits_then_byte_level(smollm2_tokenizer):
    """The SmolLM2 vocabulary with the pre-tokenizer of SmolLM2's own tokenizer.json:
    individual digits, then GPT-2's byte-level split (tokenizers' own implementations)."""
    backend = tokenizers.Tokenizer.from_str(smollm2_tokenizer.backend.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return backend


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.text(st.characters(codec="utf-8"), max_size=60))
def test_ids_equal_smollm2_tokenizer_json_on_random_text(
    smollm2_tokenizer, digits_then_byte_level, text
):
    assert smollm2_tokenizer.encode(text) == digits_then_byte_level.encode(text).ids


@pytest.mark.parametrize(
    ("text", "pieces"),
    [("\n\n0", ["ĊĊ", "0"]), ("x =  12", ["x", "Ġ=", "ĠĠ", "1", "2"])],
)
def test_whitespace_before_a_digit_stays_one_piece_like_llama_cpp(smollm2_tokenizer, text, pieces):
    """llama.cpp splits each chunk on its own, so whitespace ending a chunk is one piece."""
    got = smollm2_tokenizer.backend.pre_tokenizer.pre_tokenize_str(text)
    assert [p for p, _ in got] == pieces


def test_from_file_reads_a_directory_saved_by_transformers(
    tmp_path, smollm2_tokenizer, hf_smollm2_tokenizer
):
    hf_smollm2_tokenizer.save_pretrained(tmp_path)
    tok = Tokenizer.from_file(tmp_path / "tokenizer.json", tmp_path / "tokenizer_config.json")
    for text in PROMPTS:
        assert tok.encode(text) == smollm2_tokenizer.encode(text)
    assert tok.bos_token_id == 1 and tok.eos_token_ids == (2,)
    assert tok.is_special(2)
    messages = CONVERSATIONS[1]
    assert tok.apply_chat_template(messages) == smollm2_tokenizer.apply_chat_template(messages)


def test_add_bos_token_metadata_prepends_bos(tmp_path, ckpt):
    config = ckpt.tiny_config()
    tensors = ckpt.hf_to_gguf_tensors(ckpt.random_hf_state(config), config)
    with_bos = Tokenizer.from_gguf(
        ckpt.write_gguf(tmp_path / "a.gguf", config, tensors, add_bos=True)
    )
    without = Tokenizer.from_gguf(ckpt.write_gguf(tmp_path / "b.gguf", config, tensors))
    assert with_bos.encode("the cat") == [0, *without.encode("the cat")]
    assert with_bos.encode("the cat", add_special_tokens=False) == without.encode("the cat")
    assert without.encode(" the") == [without.token_to_id("Ġthe")]
    assert with_bos.decode(with_bos.encode("the cat")) == "the cat"


def test_unknown_pre_tokenizer_is_named(tmp_path, ckpt):
    config = ckpt.tiny_config()
    tensors = ckpt.hf_to_gguf_tensors(ckpt.random_hf_state(config), config)
    path = ckpt.write_gguf(tmp_path / "a.gguf", config, tensors, pre="mystery-bpe")
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.pre='mystery-bpe'"):
        Tokenizer.from_gguf(path)
    assert read_gguf(path).config.num_layers == 2  # the weights themselves are fine


def _tiny(template: str | None) -> Tokenizer:
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel

    backend = Backend(WordLevel({"<s>": 0, "</s>": 1, "hi": 2}, unk_token="<s>"))
    return Tokenizer(backend, bos_token_id=0, eos_token_ids=[1], chat_template=template)


def test_missing_chat_template_is_a_clear_value_error():
    with pytest.raises(ValueError, match="no chat template"):
        _tiny(None).apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_raise_exception_becomes_chat_template_error():
    tok = _tiny(
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('need a system') }}{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match="need a system"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_helpers_tojson_generation_loopcontrols_and_special_tokens():
    template = (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] == 'skip' %}{% continue %}{% endif %}"
        "{% generation %}{{ m | tojson }}{% endgeneration %}{% endfor %}"
        "{% if tools %}{{ tools | tojson(indent=2) }}{% endif %}{{ eos_token }}"
    )
    messages = [{"role": "skip", "content": "x"}, {"role": "user", "content": "héllo"}]
    out = _tiny(template).apply_chat_template(messages, tools=None)
    assert out == '<s>{"role": "user", "content": "héllo"}</s>'


def test_template_cannot_reach_python_internals():
    tok = _tiny("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(jinja2.exceptions.SecurityError, match="unsafe"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.fixture(scope="module")
def transformers_splits() -> dict[str, pre_tokenizers.PreTokenizer]:
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    return {
        pre: pre_tokenizers.Split(tokenizers.Regex(GGUF_PRE_TOKENIZER_SPLITS[pre]), "isolated")
        for pre in ("llama-bpe", "qwen2")
    }


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.sampled_from(["llama-bpe", "qwen2"]), st.text(st.characters(codec="utf-8"), max_size=60))
def test_llama3_and_qwen2_splits_equal_transformers(transformers_splits, pre, text):
    ours = byte_level_bpe(["a"], [], pre).pre_tokenizer.pre_tokenize_str(text)
    theirs = transformers_splits[pre].pre_tokenize_str(text)
    assert [p for p, _ in ours] == [byte_level_spelling(p) for p, _ in theirs]


def byte_level_spelling(piece: str) -> str:
    """GPT-2's byte-to-character spelling of ``piece``."""
    level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return "".join(p for p, _ in level.pre_tokenize_str(piece))
