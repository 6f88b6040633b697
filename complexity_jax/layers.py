"""Flax linen attention layers: projections, GQA, RoPE and a cache, thin over ``pallas_kernels``.

Each layer maps ``x [batch, seq, hidden_size]`` to ``(output [batch, seq, hidden_size], cache)``;
passing the cache back with the next tokens continues the sequence (decode or chunked prefill).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

import pallas_kernels as pk
from complexity_jax.cache import (
    CachePart,
    KVCache,
    LinearCache,
    MultiScaleCache,
    RingCache,
    check_cache_fits,
    multiscale_layout,
)
from complexity_jax.rope import apply_rope
from pallas_kernels._validation import (
    FEATURE_MAPS,
    FLOAT_DTYPES,
    IMPLEMENTATIONS,
    check_bool,
    check_choice,
    check_float_dtype,
    check_non_negative,
    check_positive,
    check_sparse_config,
    positive_real,
)

Cache = Any

# Logical axes of each projection kernel: q/k/v split their flattened heads x head_dim features over heads (heads
# major), the output projection its input; the model width is "embed" (see complexity_jax.sharding).
PROJECTION_AXES = {
    "q_proj": ("embed", "heads"),
    "k_proj": ("embed", "kv_heads"),
    "v_proj": ("embed", "kv_heads"),
    "o_proj": ("heads", "embed"),
}


class Attention(nn.Module):
    """The shared shell of every form: q/k/v/o projections without bias, GQA, RoPE, dtype handling.

    Subclasses say how heads attend (``attend``) and what a cache holds (``new_cache``).
    Query head ``h`` reads key/value head ``h // (num_heads // num_kv_heads)``.

    Every argument is checked when the layer is built, and the input and cache when it is called: a bad one
    raises ``TypeError``/``ValueError`` naming it, its value and what is allowed. A cache must come from this
    layer's ``init_cache`` or from a call of a layer with the same settings; under ``jax.jit``/``lax.scan``
    only a preallocated one (``init_cache``) can be continued (see ``complexity_jax.cache``).
    """

    hidden_size: int
    num_heads: int
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    causal: bool = True
    use_rope: bool = True
    rope_theta: float = 10000.0
    dtype: Any = None
    param_dtype: Any = jnp.float32
    implementation: str = "auto"
    interpret: bool = False
    # Box the projection kernels with Flax logical axes (``nn.with_logical_partitioning``); off by default so that
    # ``params["params"]["q_proj"]["kernel"]`` stays a plain array. complexity_jax.sharding works with either.
    logical_partitioning: bool = False

    def __post_init__(self):
        self.validate()
        super().__post_init__()

    def validate(self) -> None:
        check_positive(hidden_size=self.hidden_size, num_heads=self.num_heads)
        check_bool(causal=self.causal, use_rope=self.use_rope, interpret=self.interpret,
                   logical_partitioning=self.logical_partitioning)
        if self.num_kv_heads is not None:
            check_positive(num_kv_heads=self.num_kv_heads)
            if self.num_heads % self.num_kv_heads:
                raise ValueError(
                    f"num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})"
                )
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads}),"
                    " or give head_dim"
                )
        else:
            check_positive(head_dim=self.head_dim)
        if self.use_rope and self.kv_dim_per_head % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.kv_dim_per_head}")
        positive_real("rope_theta", self.rope_theta)
        if self.dtype is not None:
            check_float_dtype("dtype", self.dtype)
        check_float_dtype("param_dtype", self.param_dtype)
        check_choice("implementation", self.implementation, IMPLEMENTATIONS)

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def kv_dim_per_head(self) -> int:
        return self.hidden_size // self.num_heads if self.head_dim is None else self.head_dim

    @property
    def op_options(self) -> dict[str, Any]:
        return {"implementation": self.implementation, "interpret": self.interpret}

    def init_cache(self, batch_size: int, max_length: int, dtype: Any = jnp.float32) -> Cache:
        """A preallocated cache for ``max_length`` positions, for compiled decode loops (``dtype``: floating)."""
        check_positive(batch_size=batch_size, max_length=max_length)
        check_float_dtype("dtype", dtype)
        self._require_causal_for_cache()
        return self.new_cache(batch_size, max_length, dtype, growable=False)

    def _require_causal_for_cache(self) -> None:
        if not self.causal:
            raise ValueError("causal=False layers attend to future tokens: a cache is not meaningful for them")

    def _check_input(self, x: Array, cache: Cache) -> None:
        if getattr(x, "ndim", None) != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(
                f"x must have shape [batch, seq, hidden_size={self.hidden_size}], got {getattr(x, 'shape', None)}"
            )
        if jnp.dtype(x.dtype) not in FLOAT_DTYPES:
            raise TypeError(f"x must be a floating-point array, got dtype {x.dtype}")
        if 0 in x.shape:
            raise ValueError(f"x must have batch and seq of at least 1, got shape {x.shape}")
        if cache is not None:
            self._require_causal_for_cache()
            template = jax.eval_shape(lambda: self.new_cache(x.shape[0], 1, jnp.float32, growable=False))
            check_cache_fits(cache, template)

    @nn.compact
    def __call__(
        self, x: Float[Array, "b s hidden"], cache: Cache = None
    ) -> tuple[Float[Array, "b s hidden"], Cache]:
        self._check_input(x, cache)
        dtype = x.dtype if self.dtype is None else self.dtype
        b, s, _ = x.shape
        h, kvh, d = self.num_heads, self.kv_heads, self.kv_dim_per_head
        def dense(features: int, name: str) -> nn.Dense:
            init = nn.linear.default_kernel_init
            if self.logical_partitioning:
                init = nn.with_logical_partitioning(init, PROJECTION_AXES[name])
            return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=self.param_dtype, name=name,
                            kernel_init=init)

        q = dense(h * d, "q_proj")(x).reshape(b, s, h, d)
        k = dense(kvh * d, "k_proj")(x).reshape(b, s, kvh, d)
        v = dense(kvh * d, "v_proj")(x).reshape(b, s, kvh, d)
        if self.use_rope:
            start = 0 if cache is None else cache.length
            positions = start + jnp.arange(s, dtype=jnp.int32)
            q = apply_rope(q, positions, self.rope_theta)
            k = apply_rope(k, positions, self.rope_theta)
        if cache is None:
            out, new_cache = self.prefill(q, k, v)
        else:
            out, new_cache = self.continue_cache(cache, q, k, v)
        out = dense(self.hidden_size, "o_proj")(out.reshape(b, s, h * d))
        return out, new_cache

    def prefill(self, q, k, v) -> tuple[Array, Cache]:
        """Attention over a whole sequence; returns the output and a cache that continues it (causal only)."""
        out = self.attend(q, k, v)
        if not self.causal:
            return out, None
        cache = self.new_cache(k.shape[0], k.shape[1], k.dtype, growable=True)
        return out, cache.append(k, v)

    # What each form defines.
    def attend(self, q, k, v):
        """Attention over a whole sequence, no cache."""
        raise NotImplementedError

    def new_cache(self, batch: int, length: int, dtype: Any, growable: bool) -> Cache:
        raise NotImplementedError

    def continue_cache(self, cache: Cache, q, k, v) -> tuple[Array, Cache]:
        """Attention of new tokens against the cache and themselves; returns ``(out, updated cache)``."""
        raise NotImplementedError


def _attend_ring(ring: RingCache, q, k, v, windows: tuple[int, ...], op_options: dict) -> tuple[Array, RingCache]:
    """``t`` new queries of heads with per-head ``windows`` (each <= the ring size) over ``ring`` and themselves.

    Returns the output and the ring with the new keys/values written. One new token whose heads all see the whole
    ring: after writing it the ring holds exactly the positions it sees, in its first ``min(length, W)`` slots,
    and slot order does not matter (softmax is permutation-invariant), so the decode op reads the ring in place.
    Otherwise the ring is rotated into position order (slot ``j`` then holds position ``length - filled + j``,
    ``filled = min(length, W)``) and the new keys written right after the filled slots, so the decode op sees an
    ordinary linear cache of ``filled + t`` positions and applies each head's own window.
    """
    b, t = q.shape[:2]
    w = ring.window
    new_ring = ring.append(k, v)
    if t == 1 and all(window >= w for window in windows):
        filled = jnp.broadcast_to(jnp.minimum(new_ring.length, w), (b,))
        return pk.decode_attention(q, new_ring.keys, new_ring.values, filled, windows, **op_options), new_ring

    filled = jnp.minimum(ring.length, w)
    shift = jnp.where(ring.length >= w, jnp.mod(ring.length, w), 0)
    pad = [(0, 0), (0, t), (0, 0), (0, 0)]

    def linear(buf, new):
        buf = jnp.pad(jnp.roll(buf, -shift, axis=1), pad)
        return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (0, filled, 0, 0))

    lengths = jnp.broadcast_to(filled + t, (b,))
    out = pk.decode_attention(q, linear(ring.keys, k), linear(ring.values, v), lengths, windows, **op_options)
    return out, new_ring


class _KVCacheAttention(Attention):
    """Forms whose cache keeps every key/value: flash and sparse (multi-scale keeps them for its global heads)."""

    def new_cache(self, batch, length, dtype, growable):
        return KVCache.zeros(batch, length, self.kv_heads, self.kv_dim_per_head, dtype, growable)

    def continue_cache(self, cache, q, k, v):
        cache = cache.append(k, v)
        lengths = jnp.broadcast_to(cache.length, (q.shape[0],))
        q_pos, k_pos = pk.reference.cache_positions(lengths, q.shape[1], cache.capacity)
        return self.attend_cached(q, cache, lengths, q_pos, k_pos), cache

    def attend_cached(self, q, cache: KVCache, lengths, q_pos, k_pos):
        raise NotImplementedError


class FlashAttention(_KVCacheAttention):
    """Softmax attention over every earlier token (causal) or every token (``causal=False``)."""

    def attend(self, q, k, v):
        return pk.flash_attention(q, k, v, causal=self.causal, **self.op_options)

    def attend_cached(self, q, cache, lengths, q_pos, k_pos):
        return pk.decode_attention(q, cache.keys, cache.values, lengths, **self.op_options)


class SlidingWindowAttention(Attention):
    """Mistral-style sliding window: token i sees j iff ``0 <= i - j < window_size``; the cache is a ring of W."""

    window_size: int = 4096

    def validate(self) -> None:
        super().validate()
        check_positive(window_size=self.window_size)

    def attend(self, q, k, v):
        return pk.flash_attention(q, k, v, causal=self.causal, window_size=self.window_size,
                                  **self.op_options)

    def new_cache(self, batch, length, dtype, growable):
        return RingCache.zeros(batch, self.window_size, self.kv_heads, self.kv_dim_per_head, dtype)

    def continue_cache(self, cache: RingCache, q, k, v):
        return _attend_ring(cache, q, k, v, (self.window_size,) * self.num_heads, self.op_options)


class SparseAttention(_KVCacheAttention):
    """BigBird/Longformer block-sparse attention under ``pallas_kernels.sparse_mask``."""

    block_size: int = 64
    num_global_tokens: int = 1
    num_local_blocks: int = 3
    num_random_blocks: int = 3
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        check_sparse_config(self.mask)

    @property
    def mask(self) -> pk.SparseMask:
        return pk.SparseMask(self.num_heads, self.block_size, self.num_global_tokens, self.num_local_blocks,
                             self.num_random_blocks, self.seed, self.causal)

    def attend(self, q, k, v):
        return pk.sparse_attention(
            q, k, v, self.block_size, self.num_global_tokens, self.num_local_blocks,
            self.num_random_blocks, self.seed, self.causal, **self.op_options,
        )

    def attend_cached(self, q, cache, lengths, q_pos, k_pos):
        num_blocks = -(-cache.capacity // self.block_size)
        return pk.attention_at_positions(q, cache.keys.astype(q.dtype), cache.values.astype(q.dtype),
                                         q_pos, k_pos, self.mask, num_blocks=num_blocks, **self.op_options)


class MultiScaleAttention(Attention):
    """The first ``local_heads`` heads are sliding windows of ``window_sizes`` (split evenly, in order);
    the other heads attend globally. ``local_heads=None`` means ``num_heads // 2``.

    The cache is a ``MultiScaleCache``: key/value heads that serve a global head keep every position (a
    ``KVCache``); those whose query heads are all local keep a ring of their largest window (``RingCache``s),
    so only the global part grows with the length (layout: ``cache_layout``).
    """

    local_heads: Optional[int] = None
    window_sizes: tuple[int, ...] = (256, 512, 1024)

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.window_sizes, (tuple, list)) or not self.window_sizes:
            raise ValueError(f"window_sizes must be a non-empty tuple of ints, got {self.window_sizes!r}")
        for i, w in enumerate(self.window_sizes):
            check_positive(**{f"window_sizes[{i}]": w})
        if self.local_heads is not None:
            check_non_negative(local_heads=self.local_heads)
            if self.local_heads > self.num_heads:
                raise ValueError(
                    f"local_heads must be between 0 and num_heads ({self.num_heads}), got {self.local_heads}"
                )

    @property
    def head_windows(self) -> tuple[int | None, ...]:
        """The window of each query head: local head ``h`` uses ``window_sizes[h * n // local_heads]``."""
        local = self.num_heads // 2 if self.local_heads is None else self.local_heads
        n = len(self.window_sizes)
        return tuple(self.window_sizes[h * n // local] for h in range(local)) + (None,) * (self.num_heads - local)

    @property
    def cache_layout(self) -> tuple[CachePart, ...]:
        """The static split of the key/value heads into ring parts and a full part (see ``MultiScaleCache``)."""
        return multiscale_layout(self.head_windows, self.kv_heads)

    def attend(self, q, k, v):
        return pk.multiscale_attention(q, k, v, self.head_windows, causal=self.causal, **self.op_options)

    def new_cache(self, batch, length, dtype, growable):
        return MultiScaleCache.zeros(batch, length, self.cache_layout, self.kv_dim_per_head, dtype, growable)

    def continue_cache(self, cache: MultiScaleCache, q, k, v):
        layout = self.cache_layout
        outs, new_full, new_rings = [], None, []
        for part, part_cache in zip(layout, cache.part_caches()):
            qp = q[:, :, part.q_start:part.q_stop]
            kp = k[:, :, part.kv_start:part.kv_stop]
            vp = v[:, :, part.kv_start:part.kv_stop]
            if part.ring is None:
                new_full = part_cache.append(kp, vp)
                lengths = jnp.broadcast_to(new_full.length, (q.shape[0],))
                outs.append(pk.decode_attention(qp, new_full.keys, new_full.values, lengths, part.windows,
                                                **self.op_options))
            else:
                out, ring = _attend_ring(part_cache, qp, kp, vp, part.windows, self.op_options)
                outs.append(out)
                new_rings.append(ring)
        out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
        return out, cache.replace(full=new_full, rings=tuple(new_rings))


class LinearAttention(Attention):
    """Katharopoulos et al. 2020 linear attention; the cache is the ``O(1)`` recurrent state."""

    use_rope: bool = False
    feature_map: str = "elu"

    def validate(self) -> None:
        super().validate()
        check_choice("feature_map", self.feature_map, FEATURE_MAPS)

    def prefill(self, q, k, v):
        out, state = pk.linear_attention(q, k, v, self.feature_map, self.causal, **self.op_options)
        return out, LinearCache(state, jnp.asarray(q.shape[1], jnp.int32)) if self.causal else None

    def new_cache(self, batch, length, dtype, growable):
        return LinearCache(pk.reference.zero_linear_state(batch, self.kv_heads, self.kv_dim_per_head),
                           jnp.zeros((), jnp.int32))

    def continue_cache(self, cache: LinearCache, q, k, v):
        out, state = pk.linear_attention(q, k, v, self.feature_map, True, cache.state, **self.op_options)
        return out, LinearCache(state, cache.length + q.shape[1])
