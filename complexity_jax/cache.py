"""Caches that let a layer continue a sequence: pytrees that pass through ``jax.jit`` and ``lax.scan``.

- ``KVCache``: keys/values at their positions (flash, sparse, multi-scale global heads), ``O(capacity)``.
- ``RingCache``: the last ``W`` keys/values of a sliding window, position ``p`` in slot ``p % W``.
- ``LinearCache``: the recurrent state of linear attention, ``O(1)`` in length.
- ``MultiScaleCache``: a ``KVCache`` for the key/value heads that serve a global head, ``RingCache``s for the
  key/value heads whose query heads are all local.

Every cache counts positions per batch row: ``length`` is an int32 ``[batch]`` array (rows of a ragged batch
hold different lengths; each row continues at its own position). A call of ``t`` tokens may carry right padding:
``valid [batch]`` of them are real in each row, the length grows by ``valid``.

Running out of room never overwrites. A ``KVCache`` writes all ``t`` tokens of a call (padding included, past the
row's new length, where nothing reads them and the next call overwrites them), so each row needs ``t`` free slots.
Eagerly, when any row lacks them, a growable ``KVCache`` (the one a call without a cache returns) grows, a
preallocated one (``init_cache``) raises ``CacheFullError``. Under ``jit`` (or inside ``lax.scan``) the length is
traced, so:

- a growable cache cannot grow: continuing one there raises ``ValueError`` at trace time, naming ``init_cache``
  (it holds exactly the positions seen, so every new token would overflow);
- in a preallocated cache, each row that runs out of room skips its write and keeps its length, and ``overflow``
  (one flag for the whole batch) is set; the outputs of that call and of every later one are then invalid, and
  ``check_cache`` raises on the flag. ``generate`` checks it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flax import struct
from jaxtyping import Array, Bool, Float, Int

from pallas_kernels import LinearState


class CacheFullError(ValueError):
    """A cache has no room for the tokens it was given."""


def _is_concrete(x: Array) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _valid_counts(valid: Int[Array, "b"] | None, batch: int, t: int) -> Int[Array, "b"]:
    """How many of a call's ``t`` tokens are real in each row (``t`` everywhere by default)."""
    if valid is None:
        return jnp.full((batch,), t, jnp.int32)
    return jnp.asarray(valid, jnp.int32)


def _write_rows(buf: Float[Array, "b n kvh d"], new: Float[Array, "b t kvh d"], slots: Int[Array, "b t"]) -> Array:
    """``buf[r, slots[r, i]] = new[r, i]`` per row; a slot out of ``[0, n)`` drops its write (a scatter whose batch
    axis stays a parallel axis, so a batch-sharded cache is written in place on each device)."""
    return jax.vmap(lambda b, n, s: b.at[s].set(n.astype(b.dtype), mode="drop"))(buf, new, slots)


@struct.dataclass
class KVCache:
    """Keys/values of every position so far; row ``r`` has its slots ``[0, length[r])`` filled."""

    keys: Float[Array, "b capacity kvh d"]
    values: Float[Array, "b capacity kvh d"]
    length: Int[Array, "b"]
    overflow: Bool[Array, ""]
    growable: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def zeros(cls, batch: int, capacity: int, num_kv_heads: int, head_dim: int, dtype, growable: bool):
        shape = (batch, capacity, num_kv_heads, head_dim)
        # A growable cache is made by a prefill, which writes it at once: its length is a concrete (numpy) zero, also
        # under jit, so that first write is not taken for a traced continuation. A preallocated one holds arrays.
        length = np.zeros((batch,), np.int32) if growable else jnp.zeros((batch,), jnp.int32)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), length, jnp.zeros((), jnp.bool_), growable)

    @property
    def capacity(self) -> int:
        return self.keys.shape[1]

    def _grown(self, needed: int) -> KVCache:
        capacity = max(needed, 2 * self.capacity)
        pad = [(0, 0), (0, capacity - self.capacity), (0, 0), (0, 0)]
        return self.replace(keys=jnp.pad(self.keys, pad), values=jnp.pad(self.values, pad))

    def append(self, keys: Float[Array, "b t kvh d"], values: Float[Array, "b t kvh d"],
               valid: Int[Array, "b"] | None = None) -> KVCache:
        """Writes ``t`` new positions into each row after its own ``length``; ``valid [b]`` (default ``t``) of them
        are real tokens, the rest right padding: all ``t`` are written (so each row needs ``t`` free slots) and the
        row's length grows by ``valid``. See the module docstring for a full cache."""
        b, t = keys.shape[:2]
        cache = self
        if self.growable and not _is_concrete(self.length):
            raise ValueError(
                "this cache was returned by a call without a cache: it holds exactly the positions seen and grows"
                " only eagerly, so under jax.jit / lax.scan (traced length) every new token would overflow it;"
                " preallocate one with init_cache(batch_size, max_length) and pass it to the first call"
            )
        if _is_concrete(self.length):
            lengths = np.asarray(self.length)
            row = int(np.argmax(lengths))
            if int(lengths[row]) + t > self.capacity:
                if not self.growable:
                    raise CacheFullError(
                        f"row {row} of the cache holds {int(lengths[row])} of {self.capacity} positions and cannot"
                        f" take {t} more; allocate a larger one with init_cache(max_length=...)"
                    )
                cache = self._grown(int(lengths[row]) + t)
        if t > cache.capacity:
            raise CacheFullError(f"{t} new tokens do not fit a cache of capacity {cache.capacity}")
        fits = cache.length + t <= cache.capacity  # [b]
        slots = jnp.where(fits[:, None], cache.length[:, None] + jnp.arange(t, dtype=jnp.int32), cache.capacity)
        return cache.replace(
            keys=_write_rows(cache.keys, keys, slots),
            values=_write_rows(cache.values, values, slots),
            length=jnp.where(fits, cache.length + _valid_counts(valid, b, t), cache.length),
            overflow=cache.overflow | ~jnp.all(fits),
        )


@struct.dataclass
class RingCache:
    """The last ``window`` keys/values of a sliding window; position ``p`` of row ``r`` lives in slot ``p % window``
    of that row (``length[r]`` positions seen)."""

    keys: Float[Array, "b window kvh d"]
    values: Float[Array, "b window kvh d"]
    length: Int[Array, "b"]

    @classmethod
    def zeros(cls, batch: int, window: int, num_kv_heads: int, head_dim: int, dtype):
        shape = (batch, window, num_kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))

    @property
    def window(self) -> int:
        return self.keys.shape[1]

    @property
    def overflow(self) -> Bool[Array, ""]:
        return jnp.zeros((), jnp.bool_)

    def slot_positions(self) -> Int[Array, "b window"]:
        """The absolute position held by each slot of each row, -1 where the slot is still empty."""
        slots = jnp.arange(self.window, dtype=jnp.int32)[None, :]
        last = self.length[:, None] - 1
        pos = last - jnp.mod(last - slots, self.window)
        return jnp.where(pos >= 0, pos, -1)

    def append(self, keys: Float[Array, "b t kvh d"], values: Float[Array, "b t kvh d"],
               valid: Int[Array, "b"] | None = None) -> RingCache:
        """Writes ``t`` new positions per row after its own ``length``; ``valid [b]`` (default ``t``) of them are real
        tokens (right padding after, never written). Only the last ``window`` real ones of each row can matter
        later."""
        b, t = keys.shape[:2]
        valid = _valid_counts(valid, b, t)
        r = jnp.arange(t, dtype=jnp.int32)[None, :]
        keep = (r < valid[:, None]) & (r >= valid[:, None] - self.window)
        slots = jnp.where(keep, jnp.mod(self.length[:, None] + r, self.window), self.window)
        return self.replace(
            keys=_write_rows(self.keys, keys, slots),
            values=_write_rows(self.values, values, slots),
            length=self.length + valid,
        )


@struct.dataclass
class LinearCache:
    """The recurrent state of linear attention of each row after its ``length[r]`` tokens."""

    state: LinearState
    length: Int[Array, "b"]

    @property
    def overflow(self) -> Bool[Array, ""]:
        return jnp.zeros((), jnp.bool_)


@dataclasses.dataclass(frozen=True)
class CachePart:
    """Static: key/value heads ``[kv_start, kv_stop)`` and the query heads ``[q_start, q_stop)`` reading them.

    ``ring`` is the ring size (the largest window of those query heads) or ``None`` for the full part;
    ``windows`` holds each query head's window (``None`` = global).
    """

    kv_start: int
    kv_stop: int
    q_start: int
    q_stop: int
    ring: int | None
    windows: tuple[int | None, ...]


def multiscale_layout(head_windows: Sequence[int | None], num_kv_heads: int) -> tuple[CachePart, ...]:
    """Splits the key/value heads of a multi-scale layer into cache parts, in head order.

    Query head ``h`` reads key/value head ``h // group`` (``group = num_heads // num_kv_heads``). A key/value
    head whose query heads are all local needs only a ring of the largest of their windows; one that serves a
    global head (window ``None``) needs every position. Consecutive key/value heads with the same need share a
    part, so each part is a contiguous range of key/value heads and of query heads.
    """
    head_windows = tuple(head_windows)
    num_heads = len(head_windows)
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads})")
    group = num_heads // num_kv_heads
    needs = []  # per key/value head: its ring size, or None for every position
    for g in range(num_kv_heads):
        windows = head_windows[g * group:(g + 1) * group]
        needs.append(None if any(w is None for w in windows) else max(windows))
    parts: list[CachePart] = []
    start = 0
    for g in range(1, num_kv_heads + 1):
        if g == num_kv_heads or needs[g] != needs[start]:
            parts.append(CachePart(start, g, start * group, g * group, needs[start],
                                   head_windows[start * group:g * group]))
            start = g
    full = [p for p in parts if p.ring is None]
    if len(full) > 1:
        # Global heads come last, so only the trailing key/value heads serve one; never split the full part.
        raise ValueError(f"the global heads of {head_windows} do not form one contiguous range of key/value heads")
    covered = [h for p in parts for h in range(p.q_start, p.q_stop)]
    assert covered == list(range(num_heads)), (parts, num_heads)
    return tuple(parts)


@struct.dataclass
class MultiScaleCache:
    """The cache of ``MultiScaleAttention``: each group of key/value heads keeps only what its query heads see.

    Layout (static, from the layer's configuration, see ``multiscale_layout``): the key/value heads are split
    into contiguous parts, in head order.

    - ``full``: a ``KVCache`` of the key/value heads that serve at least one global query head (the trailing
      ones, including a GQA group that mixes local and global heads), ``[b, capacity, n_full, d]``: the only
      part that grows with the length, ``O(length)``. ``None`` when every query head is local.
    - ``rings``: one ``RingCache`` per run of consecutive key/value heads whose query heads are all local, of
      the largest window among those query heads, ``[b, ring, n, d]``: ``O(window)``, independent of the
      length (with ``window_sizes`` in increasing order that is one ring per distinct ring size).

    ``parts`` lists the ``CachePart``s (rings first, then the full part, i.e. in key/value-head order) and is
    static pytree metadata, not traced. ``overflow`` is the full part's flag (rings never overflow);
    ``length [b]`` counts the positions seen by each row (the full part's count: after an overflow under ``jit`` a
    row's count stops, as a ``KVCache``'s does, while the rings go on; the outputs are then invalid and
    ``check_cache`` raises).
    """

    full: KVCache | None
    rings: tuple[RingCache, ...]
    parts: tuple[CachePart, ...] = struct.field(pytree_node=False, default=())

    @classmethod
    def zeros(cls, batch: int, capacity: int, parts: Sequence[CachePart], head_dim: int, dtype,
              growable: bool) -> MultiScaleCache:
        full, rings = None, []
        for part in parts:
            n = part.kv_stop - part.kv_start
            if part.ring is None:
                full = KVCache.zeros(batch, capacity, n, head_dim, dtype, growable)
            else:
                rings.append(RingCache.zeros(batch, part.ring, n, head_dim, dtype))
        return cls(full, tuple(rings), tuple(parts))

    def part_caches(self) -> tuple[KVCache | RingCache, ...]:
        """The cache of each part, in the order of ``parts``."""
        rings = iter(self.rings)
        return tuple(self.full if part.ring is None else next(rings) for part in self.parts)

    @property
    def length(self) -> Int[Array, "b"]:
        return (self.full if self.full is not None else self.rings[0]).length

    @property
    def overflow(self) -> Bool[Array, ""]:
        return jnp.zeros((), jnp.bool_) if self.full is None else self.full.overflow

    @property
    def batch_size(self) -> int:
        return (self.full if self.full is not None else self.rings[0]).keys.shape[0]

    @property
    def capacity(self) -> int | None:
        """Positions the full part can hold (``None`` without one: the rings never run out of room)."""
        return None if self.full is None else self.full.capacity

    def append(self, keys: Float[Array, "b t kvh d"], values: Float[Array, "b t kvh d"],
               valid: Int[Array, "b"] | None = None) -> MultiScaleCache:
        """Writes ``t`` new positions of every key/value head into its part (``valid`` as in ``KVCache.append``)."""
        new = [c.append(keys[:, :, p.kv_start:p.kv_stop], values[:, :, p.kv_start:p.kv_stop], valid)
               for p, c in zip(self.parts, self.part_caches())]
        full = next((c for p, c in zip(self.parts, new) if p.ring is None), None)
        rings = tuple(c for p, c in zip(self.parts, new) if p.ring is not None)
        return self.replace(full=full, rings=rings)


def check_cache(cache: KVCache | RingCache | LinearCache | MultiScaleCache | None) -> None:
    """Raises ``CacheFullError`` if a ``jit``-compiled call had to drop tokens for want of room.

    ``overflow`` is sticky: once a call under ``jit`` found the preallocated cache full, its outputs and those of
    every later call on that cache are invalid (the dropped keys/values are missing), and the flag stays set.
    """
    if cache is not None and bool(cache.overflow):
        slots = cache.full.capacity if isinstance(cache, MultiScaleCache) else cache.keys.shape[1]
        raise CacheFullError(
            f"the cache overflowed under jit: its {slots} slots were full, so later tokens were"
            " not stored and their outputs are invalid; allocate a larger one with init_cache(max_length=...)"
        )


Cache = KVCache | RingCache | LinearCache | MultiScaleCache

# Axis names of each buffer, for error messages; ``None`` marks an axis whose size may differ (a KV cache's capacity).
_AXES: dict[type, dict[str, tuple[str | None, ...]]] = {
    KVCache: {"keys": ("batch", None, "num_kv_heads", "head_dim"),
              "values": ("batch", None, "num_kv_heads", "head_dim")},
    RingCache: {"keys": ("batch", "window_size", "num_kv_heads", "head_dim"),
                "values": ("batch", "window_size", "num_kv_heads", "head_dim")},
    LinearCache: {"state.kv": ("batch", "num_kv_heads", "head_dim", "head_dim"),
                  "state.k_sum": ("batch", "num_kv_heads", "head_dim")},
}


def check_cache_fits(cache: Any, template: Cache) -> None:
    """Raises ``TypeError``/``ValueError`` unless ``cache`` can continue a layer whose own cache looks like
    ``template`` (shapes only, e.g. from ``jax.eval_shape``): the same class (and multi-scale layout), floating
    buffers of the same batch, key/value heads, head_dim and ring size (a ``KVCache``'s capacity may differ) and
    an integer ``length`` of shape ``[batch]`` (one length per row). A cache of another layer's settings would
    otherwise be read as garbage."""
    name = type(template).__name__
    if type(cache) is not type(template):
        raise TypeError(
            f"cache must be a {name} (from this layer's init_cache or a previous call of it), got"
            f" {type(cache).__name__}"
        )
    if isinstance(template, MultiScaleCache):
        if cache.parts != template.parts:
            raise ValueError(
                f"cache has the multi-scale layout {cache.parts}, but this layer (its num_heads, num_kv_heads,"
                f" local_heads, window_sizes) needs {template.parts}"
            )
        for part, want in zip(cache.part_caches(), template.part_caches()):
            check_cache_fits(part, want)
        return
    length = getattr(cache, "length", None)
    if len(getattr(length, "shape", ())) != 1 or not jnp.issubdtype(length.dtype, jnp.integer):
        raise TypeError(
            "cache.length must be an integer array of shape [batch] (each row's own length; a scalar length is"
            f" not accepted), got {length!r}"
        )
    for field, axes in _AXES[type(template)].items():
        got, want = _field(cache, field), _field(template, field)
        if not jnp.issubdtype(got.dtype, jnp.floating):
            raise TypeError(
                f"cache.{field} has dtype {got.dtype}; a cache holds floating-point values (init_cache(...,"
                " dtype=jnp.bfloat16) for example)"
            )
        if len(got.shape) != len(want.shape) or any(
            axis is not None and g != w for axis, g, w in zip(axes, got.shape, want.shape)
        ):
            need = ", ".join(f"{axis}={w}" if axis else "any" for axis, w in zip(axes, want.shape))
            raise ValueError(
                f"cache.{field} has shape {tuple(got.shape)}, but this layer and input need [{need}]: the cache"
                " comes from a layer with other settings or another batch size"
            )
    if length.shape != template.length.shape:
        raise ValueError(
            f"cache.length has shape {tuple(length.shape)}, but this input needs [batch={template.length.shape[0]}]:"
            " the cache comes from another batch size"
        )


def _field(cache: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cache = getattr(cache, part)
    return cache
