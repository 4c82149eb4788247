"""The serving engine: block pool, KV cache manager, scheduler, model runner, sampler.

The host-side policy modules (``block_pool``, ``kv_cache_manager``, ``scheduler``) never
import JAX; they hand the model runner plain dataclasses (``SchedulerOutput``) and read
back plain dataclasses (``ModelRunnerOutput``).
"""
