"""Tokenizers for our models: a ``tokenizers.Tokenizer`` plus special ids and a chat template.

Built either from a GGUF file's metadata (llama.cpp's byte-level BPE: vocab, merges, token
types, and the pre-tokenizer named by ``tokenizer.ggml.pre``) or from a Hugging Face
``tokenizer.json`` with its ``tokenizer_config.json``. Chat templates render in a sandboxed
jinja2 environment with the helpers Hugging Face templates expect.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import gguf
import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import tokenizers
from tokenizers import decoders, pre_tokenizers, processors
from tokenizers import models as token_models

from models.gguf_checkpoint import GGUFMetadata, open_gguf

# GGUF token types (llama.cpp's ``llama_token_type``).
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4

# Split regexes llama.cpp applies, in order, for each ``tokenizer.ggml.pre`` (each match and
# each gap between matches becomes a piece, and the next regex splits those pieces further).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")

PRE_TOKENIZER_SPLITS: Mapping[str, tuple[str, ...]] = {
    "default": _DEFAULT,
    "gpt-2": (_GPT2,),
    "gpt2": (_GPT2,),
    "mpt": (_GPT2,),
    "olmo": (_GPT2,),
    # individual digits first, then GPT-2's split
    "smollm": (r"\p{N}", _GPT2),
    "starcoder": (r"\p{N}", _GPT2),
    "refact": (r"\p{N}", _GPT2),
    "codeshell": (r"\p{N}", _GPT2),
    "llama3": (_LLAMA3,),
    "llama-bpe": (_LLAMA3,),
    "llama-v3": (_LLAMA3,),
    "smaug-bpe": (_LLAMA3,),
    "dbrx": (_LLAMA3,),
    "falcon3": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "deepseek-r1-qwen": (_QWEN2,),
}
# llama.cpp looks a whole pre-token up in the vocabulary before merging only for these.
IGNORE_MERGES = frozenset({"llama3", "llama-bpe", "llama-v3", "smaug-bpe", "dbrx", "falcon3"})


class ChatTemplateError(ValueError):
    """A chat template is missing, or raised an error while rendering."""


class Tokenizer:
    """Text to token ids and back, special ids, and chat-template rendering.

    >>> tok = Tokenizer.from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    >>> tok.decode(tok.encode("Hello world"))
    'Hello world'
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: Iterable[int],
        chat_template: str | None = None,
        special_ids: Iterable[int] = (),
    ):
        self.backend = backend
        self._bos = bos_token_id
        self._eos = tuple(dict.fromkeys(int(i) for i in eos_token_ids))
        self._special = frozenset(special_ids) | frozenset(self._eos)
        if bos_token_id is not None:
            self._special |= {bos_token_id}
        self.chat_template = chat_template
        self._template = None if chat_template is None else _compile_template(chat_template)

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, source: str | os.PathLike[str] | gguf.GGUFReader) -> Tokenizer:
        """The tokenizer in a GGUF file's metadata (``tokenizer.ggml.model`` must be gpt2)."""
        reader = source if isinstance(source, gguf.GGUFReader) else open_gguf(source)
        meta = GGUFMetadata(reader)
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(
                f"tokenizer.ggml.model={kind!r}: only byte-level BPE ('gpt2') is supported"
            )
        tokens: list[str] = meta.require("tokenizer.ggml.tokens")
        types: list[int] = meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
        pre = meta.get("tokenizer.ggml.pre", "default")
        backend = byte_level_bpe(tokens, meta.require("tokenizer.ggml.merges"), pre)
        _add_marked_tokens(backend, tokens, types)
        bos = meta.get("tokenizer.ggml.bos_token_id")
        eos = [meta.get(f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id")]
        eos_ids = [i for i in eos if i is not None]
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
        add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
        backend.post_processor = _template_processing(
            tokens, bos if add_bos else None, eos_ids[0] if add_eos and eos_ids else None
        )
        control = [i for i, t in enumerate(types) if t == TOKEN_CONTROL]
        return cls(
            backend,
            bos_token_id=bos,
            eos_token_ids=eos_ids,
            chat_template=meta.get("tokenizer.chat_template"),
            special_ids=control,
        )

    @classmethod
    def from_file(
        cls,
        tokenizer_file: str | os.PathLike[str],
        config_file: str | os.PathLike[str] | None = None,
        *,
        extra_eos_token_ids: Iterable[int] = (),
    ) -> Tokenizer:
        """A Hugging Face ``tokenizer.json``, with ``tokenizer_config.json`` for the special
        tokens and the chat template (or a ``chat_template.jinja`` beside it).

        ``extra_eos_token_ids`` adds stop ids a model's ``config.json`` lists beyond the
        tokenizer's own ``eos_token``.
        """
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        config: dict[str, Any] = {}
        if config_file is not None and Path(config_file).exists():
            config = json.loads(Path(config_file).read_text())
        bos = _token_id(backend, config.get("bos_token"))
        eos = _token_id(backend, config.get("eos_token"))
        template = _config_template(config, Path(config_file or tokenizer_file).parent)
        special = [i for i, t in backend.get_added_tokens_decoder().items() if t.special]
        return cls(
            backend,
            bos_token_id=bos,
            eos_token_ids=([eos] if eos is not None else []) + list(extra_eos_token_ids),
            chat_template=template,
            special_ids=special,
        )

    # ---- use --------------------------------------------------------------------------

    @property
    def bos_token_id(self) -> int | None:
        """Beginning-of-sequence id, or None when the vocabulary has none."""
        return self._bos

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends generation (EOS, and end-of-turn where the model has one)."""
        return self._eos

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` the BOS/EOS the model asks for."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens (BOS, EOS, control) dropped when asked."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def is_special(self, token_id: int) -> bool:
        """Whether ``token_id`` is a special (control) token such as BOS, EOS or ``<|im_end|>``."""
        return int(token_id) in self._special

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry, or None."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry of an id (in the byte-level spelling), or None."""
        return self.backend.id_to_token(int(token_id))

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """Render ``messages`` (``{"role": ..., "content": ...}``) with the model's template."""
        if self._template is None:
            raise ChatTemplateError(
                "this tokenizer has no chat template (no tokenizer.chat_template in the GGUF "
                "metadata, no chat_template in tokenizer_config.json); format the prompt yourself"
            )
        tokens = {
            "bos_token": self._token_text(self._bos),
            "eos_token": self._token_text(self._eos[0] if self._eos else None),
        }
        return self._template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            **{**tokens, **kwargs},
        )

    def _token_text(self, token_id: int | None) -> str:
        if token_id is None:
            return ""
        return self.backend.decode([token_id], skip_special_tokens=False)


# ---- building a byte-level BPE -------------------------------------------------------------


def byte_level_bpe(tokens: Sequence[str], merges: Sequence[str], pre: str) -> tokenizers.Tokenizer:
    """A GPT-2 style byte-level BPE with llama.cpp's pre-tokenizer for ``pre``."""
    if pre not in PRE_TOKENIZER_SPLITS:
        raise ValueError(
            f"tokenizer.ggml.pre={pre!r}: unknown pre-tokenizer; known: "
            f"{sorted(PRE_TOKENIZER_SPLITS)}"
        )
    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [_merge_pair(m) for m in merges]
    model = token_models.BPE(vocab, pairs, ignore_merges=pre in IGNORE_MERGES)
    backend = tokenizers.Tokenizer(model)
    splits = [
        pre_tokenizers.Split(tokenizers.Regex(r), behavior="isolated")
        for r in PRE_TOKENIZER_SPLITS[pre]
    ]
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def _merge_pair(merge: str) -> tuple[str, str]:
    parts = merge.split(" ")
    if len(parts) != 2:
        raise ValueError(f"tokenizer.ggml.merges entry {merge!r}: expected two tokens")
    return parts[0], parts[1]


def _add_marked_tokens(backend: tokenizers.Tokenizer, tokens: Sequence[str], types: Sequence[int]):
    """Control tokens become special added tokens, user-defined ones plain added tokens, so
    that both are matched whole in text, as llama.cpp does."""
    control = [tokens[i] for i, t in enumerate(types) if t == TOKEN_CONTROL]
    user = [tokens[i] for i, t in enumerate(types) if t == TOKEN_USER_DEFINED]
    backend.add_special_tokens([tokenizers.AddedToken(t, normalized=False) for t in control])
    backend.add_tokens([tokenizers.AddedToken(t, normalized=False) for t in user])


def _template_processing(
    tokens: Sequence[str], bos: int | None, eos: int | None
) -> processors.TemplateProcessing:
    first = [tokens[bos]] if bos is not None else []
    last = [tokens[eos]] if eos is not None else []
    special = [(tokens[i], i) for i in (bos, eos) if i is not None]
    return processors.TemplateProcessing(
        single=[*first, "$A", *last],
        pair=[*first, "$A", *last, *first, "$B", *last],
        special_tokens=list(dict.fromkeys(special)),
    )


def _token_id(backend: tokenizers.Tokenizer, token: str | Mapping[str, Any] | None) -> int | None:
    if isinstance(token, Mapping):
        token = token.get("content")
    return None if token is None else backend.token_to_id(token)


def _config_template(config: Mapping[str, Any], directory: Path) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default")
    if template is None and (directory / "chat_template.jinja").exists():
        template = (directory / "chat_template.jinja").read_text()
    return template


# ---- chat templates ----------------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (marks assistant text); renders its body."""

    tags = {"generation"}  # noqa: RUF012 (jinja2 declares it a class-level set)

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"chat template: {message}")


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, **kw: Any
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, **kw)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _compile_template(source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _GenerationTag],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not parse: {e}") from e
