"""Caches that let a layer continue a sequence: pytrees that pass through ``jax.jit`` and ``lax.scan``.

- ``KVCache``: keys/values at their positions (flash, sparse, multi-scale), ``O(capacity)``.
- ``RingCache``: the last ``W`` keys/values of a sliding window, position ``p`` in slot ``p % W``.
- ``LinearCache``: the recurrent state of linear attention, ``O(1)`` in length.

Running out of room never overwrites. Eagerly, a growable ``KVCache`` (the one a call without a cache
returns) grows, a preallocated one (``init_cache``) raises ``CacheFullError``. Under ``jit`` the length
is traced, so the write is skipped and ``overflow`` is set: ``check_cache`` raises on it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Bool, Float, Int

from pallas_kernels import LinearState


class CacheFullError(ValueError):
    """A cache has no room for the tokens it was given."""


def _is_concrete(x: Array) -> bool:
    return not isinstance(x, jax.core.Tracer)


@struct.dataclass
class KVCache:
    """Keys/values of every position so far; slots ``[0, length)`` are filled."""

    keys: Float[Array, "b capacity kvh d"]
    values: Float[Array, "b capacity kvh d"]
    length: Int[Array, ""]
    overflow: Bool[Array, ""]
    growable: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def zeros(cls, batch: int, capacity: int, num_kv_heads: int, head_dim: int, dtype, growable: bool):
        shape = (batch, capacity, num_kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32),
                   jnp.zeros((), jnp.bool_), growable)

    @property
    def capacity(self) -> int:
        return self.keys.shape[1]

    def _grown(self, needed: int) -> KVCache:
        capacity = max(needed, 2 * self.capacity)
        pad = [(0, 0), (0, capacity - self.capacity), (0, 0), (0, 0)]
        return self.replace(keys=jnp.pad(self.keys, pad), values=jnp.pad(self.values, pad))

    def append(self, keys: Float[Array, "b t kvh d"], values: Float[Array, "b t kvh d"]) -> KVCache:
        """Writes ``t`` new positions after ``length`` (see the module docstring for a full cache)."""
        t = keys.shape[1]
        cache = self
        if _is_concrete(self.length) and int(self.length) + t > self.capacity:
            if not self.growable:
                raise CacheFullError(
                    f"the cache holds {int(self.length)} of {self.capacity} positions and cannot take {t} more;"
                    " allocate a larger one with init_cache(max_length=...)"
                )
            cache = self._grown(int(self.length) + t)
        if t > cache.capacity:
            raise CacheFullError(f"{t} new tokens do not fit a cache of capacity {cache.capacity}")
        fits = cache.length + t <= cache.capacity
        start = (0, cache.length, 0, 0)
        write = lambda buf, new: jax.lax.cond(
            fits, lambda: jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), start), lambda: buf
        )
        return cache.replace(
            keys=write(cache.keys, keys),
            values=write(cache.values, values),
            length=jnp.where(fits, cache.length + t, cache.length),
            overflow=cache.overflow | ~fits,
        )


@struct.dataclass
class RingCache:
    """The last ``window`` keys/values of a sliding window; position ``p`` lives in slot ``p % window``."""

    keys: Float[Array, "b window kvh d"]
    values: Float[Array, "b window kvh d"]
    length: Int[Array, ""]

    @classmethod
    def zeros(cls, batch: int, window: int, num_kv_heads: int, head_dim: int, dtype):
        shape = (batch, window, num_kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))

    @property
    def window(self) -> int:
        return self.keys.shape[1]

    @property
    def overflow(self) -> Bool[Array, ""]:
        return jnp.zeros((), jnp.bool_)

    def slot_positions(self) -> Int[Array, "window"]:
        """The absolute position held by each slot, -1 where the slot is still empty."""
        slots = jnp.arange(self.window, dtype=jnp.int32)
        last = self.length - 1
        pos = last - jnp.mod(last - slots, self.window)
        return jnp.where(pos >= 0, pos, -1)

    def append(self, keys: Float[Array, "b t kvh d"], values: Float[Array, "b t kvh d"]) -> RingCache:
        """Writes ``t`` new positions; only the last ``window`` of them can matter later."""
        keep = min(keys.shape[1], self.window)
        positions = self.length + keys.shape[1] - keep + jnp.arange(keep, dtype=jnp.int32)
        slots = jnp.mod(positions, self.window)
        return self.replace(
            keys=self.keys.at[:, slots].set(keys[:, -keep:].astype(self.keys.dtype)),
            values=self.values.at[:, slots].set(values[:, -keep:].astype(self.values.dtype)),
            length=self.length + keys.shape[1],
        )


@struct.dataclass
class LinearCache:
    """The recurrent state of linear attention after ``length`` tokens."""

    state: LinearState
    length: Int[Array, ""]

    @property
    def overflow(self) -> Bool[Array, ""]:
        return jnp.zeros((), jnp.bool_)


def check_cache(cache: KVCache | RingCache | LinearCache | None) -> None:
    """Raises ``CacheFullError`` if a ``jit``-compiled call had to drop tokens for want of room."""
    if cache is not None and bool(cache.overflow):
        raise CacheFullError(
            f"the cache overflowed under jit: its {cache.keys.shape[1]} slots were full, so later tokens were"
            " not stored and their outputs are invalid; allocate a larger one with init_cache(max_length=...)"
        )
