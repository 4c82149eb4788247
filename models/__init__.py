"""Plain Flax NNX models and their checkpoint loaders."""

from models.config import LlamaConfig, RopeScaling
from models.kv_cache import DenseKVCache, KVCache, NoCache
from models.llama import Llama
from models.loader import load
from models.tokenizer import Tokenizer

__all__ = [
    "DenseKVCache",
    "KVCache",
    "Llama",
    "LlamaConfig",
    "NoCache",
    "RopeScaling",
    "Tokenizer",
    "load",
]
