"""Prefill then a compiled decode loop through a stack of attention layers.

The stack is a minimal residual decoder (``x = x + attention(x)`` per layer), enough to show the caches
working together under ``jax.jit`` and ``jax.lax.scan``. There is no vocabulary: each step feeds the last
output back as the next input, so the loop is a continuous autoregression.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from complexity_jax.cache import check_cache
from complexity_jax.layers import Attention


class AttentionStack(nn.Module):
    """Residual stack of attention layers; the cache is the tuple of the layers' caches."""

    layers: Sequence[Attention]

    def __call__(
        self, x: Float[Array, "b s hidden"], caches: tuple[Any, ...] | None = None
    ) -> tuple[Float[Array, "b s hidden"], tuple[Any, ...]]:
        new_caches = []
        for i, layer in enumerate(self.layers):
            out, cache = layer(x, cache=None if caches is None else caches[i])
            x = x + out
            new_caches.append(cache)
        return x, tuple(new_caches)

    def init_cache(self, batch_size: int, max_length: int, dtype: Any = jnp.float32) -> tuple[Any, ...]:
        return tuple(layer.init_cache(batch_size, max_length, dtype) for layer in self.layers)


def generate(
    stack: AttentionStack,
    params: Any,
    prompt: Float[Array, "b s hidden"],
    num_steps: int,
    max_length: int | None = None,
) -> tuple[Float[Array, "b s hidden"], Float[Array, "b n hidden"], tuple[Any, ...]]:
    """Prefills ``prompt`` into preallocated caches, then decodes ``num_steps`` tokens in one jitted scan.

    Returns the prompt's outputs, the ``num_steps`` decoded outputs (step ``t`` consumed output ``t - 1``,
    the first step the prompt's last output) and the final caches. Raises ``CacheFullError`` if
    ``max_length`` (default: prompt length + ``num_steps``) was too small.
    """
    batch, length, _ = prompt.shape
    max_length = length + num_steps if max_length is None else max_length
    caches = stack.init_cache(batch, max_length, prompt.dtype)
    prefill_out, caches = stack.apply(params, prompt, caches)

    @jax.jit
    def decode(caches, first):
        def step(carry, _):
            caches, x = carry
            y, caches = stack.apply(params, x, caches)
            return (caches, y), y[:, 0]

        (caches, _), ys = jax.lax.scan(step, (caches, first), None, length=num_steps)
        return jnp.swapaxes(ys, 0, 1), caches

    decoded, caches = decode(caches, prefill_out[:, -1:])
    for cache in caches:
        check_cache(cache)
    return prefill_out, decoded, caches
