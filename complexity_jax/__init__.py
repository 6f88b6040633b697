"""complexity-jax: every useful attention form as Flax layers over Pallas GPU kernels."""

from complexity_jax.api import CUDA, LAYERS
from complexity_jax.cache import CacheFullError, KVCache, LinearCache, MultiScaleCache, RingCache, check_cache
from complexity_jax.layers import (
    Attention,
    FlashAttention,
    LinearAttention,
    MultiScaleAttention,
    SlidingWindowAttention,
    SparseAttention,
)

__all__ = [
    "CUDA",
    "LAYERS",
    "Attention",
    "CacheFullError",
    "FlashAttention",
    "KVCache",
    "LinearAttention",
    "LinearCache",
    "MultiScaleAttention",
    "MultiScaleCache",
    "RingCache",
    "SlidingWindowAttention",
    "SparseAttention",
    "check_cache",
]
