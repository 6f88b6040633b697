"""The ``CUDA`` namespace: one factory per attention form, each returning a ``flax.linen.Module``.

>>> attn = CUDA.flash(hidden_size=4096, num_heads=32, num_kv_heads=8)
>>> params = attn.init(jax.random.key(0), x)
>>> output, cache = attn.apply(params, x)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from complexity_jax.layers import (
    FlashAttention,
    LinearAttention,
    MultiScaleAttention,
    SlidingWindowAttention,
    SparseAttention,
)

LAYERS: dict[str, type[nn.Module]] = {
    "flash": FlashAttention,
    "sliding_window": SlidingWindowAttention,
    "sparse": SparseAttention,
    "linear": LinearAttention,
    "multiscale": MultiScaleAttention,
}


class CUDA:
    """Factories for the five attention layers (all arguments are keywords)."""

    @staticmethod
    def flash(**kwargs: Any) -> FlashAttention:
        """Causal softmax attention (``causal=False``: bidirectional)."""
        return FlashAttention(**kwargs)

    @staticmethod
    def sliding_window(**kwargs: Any) -> SlidingWindowAttention:
        """Sliding-window attention, ``window_size=4096`` by default (Mistral)."""
        return SlidingWindowAttention(**kwargs)

    @staticmethod
    def sparse(**kwargs: Any) -> SparseAttention:
        """BigBird/Longformer block-sparse attention: local, global and random blocks."""
        return SparseAttention(**kwargs)

    @staticmethod
    def linear(**kwargs: Any) -> LinearAttention:
        """Linear attention with an ``elu``/``relu``/``softmax`` feature map and an O(1) state."""
        return LinearAttention(**kwargs)

    @staticmethod
    def multiscale(**kwargs: Any) -> MultiScaleAttention:
        """Local heads with per-head windows beside global heads."""
        return MultiScaleAttention(**kwargs)

    @staticmethod
    def create(attn_type: str, **kwargs: Any) -> nn.Module:
        """The layer named by ``attn_type`` (one of ``LAYERS``), built with ``kwargs``."""
        if attn_type not in LAYERS:
            raise ValueError(f"attn_type must be one of {tuple(LAYERS)}, got {attn_type!r}")
        return LAYERS[attn_type](**kwargs)
