"""Rotary position embedding, rotate-half convention (Llama, Mistral)."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def apply_rope(
    x: Float[Array, "b s h d"], positions: Int[Array, "s"] | Int[Array, "b s"], theta: float
) -> Float[Array, "b s h d"]:
    """Rotates pairs ``(x[i], x[i + d/2])`` by ``position * theta ** (-2i / d)``; computed in float32.

    ``positions`` is ``[s]`` (every row at the same positions) or ``[b, s]`` (each row at its own: ragged rows of a
    cache, packed segments that restart at 0).
    """
    half = x.shape[-1] // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / x.shape[-1])
    positions = jnp.asarray(positions)
    if positions.ndim not in (1, 2):
        raise ValueError(f"positions must have shape [seq] or [batch, seq], got {positions.shape}")
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [(b,) s, half]
    angles = angles[None, :, None, :] if positions.ndim == 1 else angles[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
