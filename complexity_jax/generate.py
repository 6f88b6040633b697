"""Prefill then a compiled decode loop through a stack of attention layers.

The stack is a minimal residual decoder (``x = x + attention(x)`` per layer), enough to show the caches
working together under ``jax.jit`` and ``jax.lax.scan``. There is no vocabulary: each step feeds the last
output back as the next input, so the loop is a continuous autoregression. Prompts may be ragged (right padding
with ``prompt_lengths``): each row then decodes from its own last prompt token, at its own positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from complexity_jax.cache import check_cache
from complexity_jax.layers import Attention
from pallas_kernels._validation import check_seq_lengths


class AttentionStack(nn.Module):
    """Residual stack of attention layers; the cache is the tuple of the layers' caches.

    ``segment_ids`` and ``lengths`` go to every layer (see ``Attention.__call__``); with ``lengths`` the outputs
    past each row's length are zeros (the residual stream itself carries the padding through the layers)."""

    layers: Sequence[Attention]

    def __call__(
        self,
        x: Float[Array, "b s hidden"],
        caches: tuple[Any, ...] | None = None,
        *,
        segment_ids: Int[Array, "b s"] | None = None,
        lengths: Int[Array, "b"] | None = None,
    ) -> tuple[Float[Array, "b s hidden"], tuple[Any, ...]]:
        new_caches = []
        for i, layer in enumerate(self.layers):
            out, cache = layer(x, cache=None if caches is None else caches[i], segment_ids=segment_ids,
                               lengths=lengths)
            x = x + out
            new_caches.append(cache)
        if lengths is not None:
            x = jnp.where(jnp.arange(x.shape[1])[None, :, None] < lengths[:, None, None], x, jnp.zeros((), x.dtype))
        return x, tuple(new_caches)

    def init_cache(self, batch_size: int, max_length: int, dtype: Any = jnp.float32) -> tuple[Any, ...]:
        return tuple(layer.init_cache(batch_size, max_length, dtype) for layer in self.layers)


def generate(
    stack: AttentionStack,
    params: Any,
    prompt: Float[Array, "b s hidden"],
    num_steps: int,
    max_length: int | None = None,
    prompt_lengths: Int[Array, "b"] | None = None,
) -> tuple[Float[Array, "b s hidden"], Float[Array, "b n hidden"], tuple[Any, ...]]:
    """Prefills ``prompt`` into preallocated caches, then decodes ``num_steps`` tokens in a ``lax.scan``: one jitted
    function (compiled per shape of ``prompt``, ``num_steps`` and ``max_length``).

    ``prompt_lengths [b]`` (int, each in ``[1, s]``; default: every row ``s``): ragged prompts, right-padded to
    ``[b, s, hidden]``; row ``r``'s prompt is ``prompt[r, :prompt_lengths[r]]`` and the padding is never seen.

    Returns the prompt's outputs ``[b, s, hidden]`` (zeros past each row's prompt length), the ``num_steps``
    decoded outputs ``[b, num_steps, hidden]`` (step ``t`` consumed output ``t - 1``; the first step row ``r``'s
    output at its own last prompt token ``prompt_lengths[r] - 1``; every row decodes ``num_steps`` real steps, at
    positions ``prompt_lengths[r] + t``, so row ``r`` equals generating that row alone from its unpadded prompt) and
    the final caches (row ``r`` at length ``prompt_lengths[r] + num_steps``). Raises ``CacheFullError`` if
    ``max_length`` (default: ``s + num_steps``) was too small: the padded prompt takes ``s`` slots of every row.
    """
    batch, length, _ = prompt.shape
    max_length = length + num_steps if max_length is None else max_length
    if prompt_lengths is not None:
        prompt_lengths = check_seq_lengths("prompt_lengths", prompt_lengths, batch, length)
        if not isinstance(prompt_lengths, jax.core.Tracer) and int(prompt_lengths.min()) < 1:
            raise ValueError(
                f"prompt_lengths must lie in [1, {length}] (each row needs a prompt token to start from), got"
                f" {prompt_lengths.tolist()}"
            )

    @jax.jit
    def run(params, prompt, prompt_lengths):
        caches = stack.init_cache(batch, max_length, prompt.dtype)
        prefill_out, caches = stack.apply(params, prompt, caches, lengths=prompt_lengths)
        if prompt_lengths is None:
            first = prefill_out[:, -1:]
        else:  # each row's output at its own last prompt token
            first = jnp.take_along_axis(prefill_out, (prompt_lengths - 1)[:, None, None], axis=1)

        def step(carry, _):
            caches, x = carry
            y, caches = stack.apply(params, x, caches)
            return (caches, y), y[:, 0]

        (caches, _), ys = jax.lax.scan(step, (caches, first), None, length=num_steps)
        return prefill_out, jnp.swapaxes(ys, 0, 1), caches

    prefill_out, decoded, caches = run(params, prompt, prompt_lengths)
    for cache in caches:
        check_cache(cache)
    return prefill_out, decoded, caches
