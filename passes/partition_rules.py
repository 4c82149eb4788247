"""Megatron partition rules: which dimension of each weight is split over the ``tp`` axis.

A rule is ``(regex, split_dim | None)`` matched with ``re.search`` against a dotted parameter
path; the first match wins, user rules before the defaults, and an unmatched weight is
replicated.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

Rule = tuple[str, int | None]

DEFAULT_RULES: tuple[Rule, ...] = (
    # Llama / Hugging Face names; nnx.Linear kernels are [in, out].
    (r"(^|\.)(q_proj|k_proj|v_proj|gate_proj|up_proj)\.kernel$", 1),  # column parallel
    (r"(^|\.)(q_proj|k_proj|v_proj|gate_proj|up_proj)\.bias$", 0),
    (r"(^|\.)(o_proj|down_proj)\.kernel$", 0),  # row parallel
    (r"(^|\.)(o_proj|down_proj)\.bias$", None),
    # Stock flax.nnx MultiHeadAttention: query/key/value [in, heads, head_dim], out
    # [heads, head_dim, out]: split by heads.
    (r"(^|\.)(query|key|value)\.kernel$", 1),
    (r"(^|\.)(query|key|value)\.bias$", 0),
    (r"(^|\.)out\.kernel$", 0),
    (r"(^|\.)out\.bias$", None),
    # An untied vocabulary head: column parallel (the logits come out split over V).
    (r"(^|\.)lm_head\.kernel$", 1),
    # Embeddings, norms and everything else: replicated.
    (r"(^|\.)(embed_tokens|lm_head|norm|embedding)", None),
)


def resolve_split(path: str, ndim: int, user_rules: Sequence[Rule] = ()) -> int | None:
    """The dimension of ``path``'s weight to split (None: replicate); user rules first."""
    for pattern, dim in (*user_rules, *DEFAULT_RULES):
        if re.search(pattern, path):
            if dim is None:
                return None
            d = dim + ndim if dim < 0 else dim
            if not 0 <= d < ndim:
                raise ValueError(
                    f"partition rule {pattern!r} splits dim {dim} of {path!r}, which has "
                    f"{ndim} dims"
                )
            return d
    return None
