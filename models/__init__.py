"""Plain Flax NNX models and their checkpoint loaders."""

from models.config import LlamaConfig, RopeScaling
from models.kv_cache import DenseKVCache, KVCache, NoCache
from models.llama import Llama

__all__ = ["DenseKVCache", "KVCache", "Llama", "LlamaConfig", "NoCache", "RopeScaling"]
