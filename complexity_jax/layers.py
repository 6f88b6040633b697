"""Flax linen attention layers: projections, GQA, RoPE and a cache, thin over ``pallas_kernels``.

Each layer maps ``x [batch, seq, hidden_size]`` to ``(output [batch, seq, hidden_size], cache)``;
passing the cache back with the next tokens continues the sequence (decode or chunked prefill).
``segment_ids`` packs several sequences in a row, ``lengths`` makes rows ragged (right padding); see
``Attention.__call__``.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

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
from pallas_kernels.masks import segment_starts
from pallas_kernels._validation import (
    FEATURE_MAPS,
    FLOAT_DTYPES,
    IMPLEMENTATIONS,
    check_bool,
    check_choice,
    check_float_dtype,
    check_non_negative,
    check_positive,
    check_segment_ids,
    check_seq_lengths,
    check_sparse_config,
    logits_soft_cap_or_none,
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
# Logical axes of every parameter: the projections' kernels and the attention sinks (one logit per query head).
PARAMETER_AXES = {**PROJECTION_AXES, "sinks": ("heads",)}


class Attention(nn.Module):
    """The shared shell of every form: q/k/v/o projections without bias, GQA, RoPE, dtype handling.

    Subclasses say how heads attend (``attend``) and what a cache holds (``new_cache``).
    Query head ``h`` reads key/value head ``h // (num_heads // num_kv_heads)``.

    Every argument is checked when the layer is built, and the input and cache when it is called: a bad one
    raises ``TypeError``/``ValueError`` naming it, its value and what is allowed. A cache must come from this
    layer's ``init_cache`` or from a call of a layer with the same settings; under ``jax.jit``/``lax.scan``
    only a preallocated one (``init_cache``) can be continued (see ``complexity_jax.cache``).

    Softmax forms also take ``logits_soft_cap`` (scaled scores become ``cap * tanh(s / cap)`` before masking,
    Gemma 2) and ``use_sinks`` (a parameter ``sinks [num_heads]``, zeros at init: one logit per query head for a key
    every query sees and whose value is zero, gpt-oss); both apply to prefill, continuation and decode alike.
    Linear attention has no softmax: it refuses both.
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
    logits_soft_cap: Optional[float] = None
    use_sinks: bool = False

    def __post_init__(self):
        self.validate()
        super().__post_init__()

    def validate(self) -> None:
        check_positive(hidden_size=self.hidden_size, num_heads=self.num_heads)
        check_bool(causal=self.causal, use_rope=self.use_rope, interpret=self.interpret,
                   logical_partitioning=self.logical_partitioning, use_sinks=self.use_sinks)
        logits_soft_cap_or_none(self.logits_soft_cap)
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
        """The keywords of every op call of this layer: the backend, and the soft-cap and sinks where set (a
        layer with ``use_sinks`` reads its ``sinks`` parameter: call this inside ``apply``)."""
        options: dict[str, Any] = {"implementation": self.implementation, "interpret": self.interpret}
        if self.logits_soft_cap is not None:
            options["logits_soft_cap"] = self.logits_soft_cap
        if self.use_sinks:
            options["sinks"] = nn.meta.unbox(self.get_variable("params", "sinks"))
        return options

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

    def _check_packing(self, x: Array, cache: Cache, segment_ids, lengths):
        b, s, _ = x.shape
        if segment_ids is not None:
            if cache is not None:
                raise ValueError(
                    "segment_ids cannot be combined with a cache: a continuation extends the one sequence of each"
                    " row (the cache of a packed call already holds the last segment of each row)"
                )
            segment_ids = check_segment_ids("segment_ids", segment_ids, b, s)
        if lengths is not None:
            lengths = check_seq_lengths("lengths", lengths, b, s)
        return segment_ids, lengths

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "b s hidden"],
        cache: Cache = None,
        *,
        segment_ids: Optional[Int[Array, "b s"]] = None,
        lengths: Optional[Int[Array, "b"]] = None,
    ) -> tuple[Float[Array, "b s hidden"], Cache]:
        """``(output [b, s, hidden], cache)``.

        Without ``cache``, ``x`` is each row's sequence from position 0; with one, the next ``s`` positions of each
        row, from that row's own ``cache.length`` (RoPE included).

        ``segment_ids [b, s]`` (int, non-negative; no cache): each row packs several sequences, contiguous runs of
        one id; a token attends only within its run and its RoPE position restarts at the run's start, so a packed
        row equals its segments run alone (sparse: the BigBird block grid stays the packed row's, see
        ``pallas_kernels.sparse_attention``). The returned cache continues the LAST segment of each row (the one
        holding its last valid token) as if that segment had been run alone: it holds only that segment's
        keys/values (or state), and its length is that segment's length.

        ``lengths [b]`` (int, right padding): row ``r`` holds ``lengths[r]`` real tokens, the rest is padding that
        no token sees. Outputs past a row's length are zeros. The returned cache records each row's own length,
        and the next call continues each row at its own position. With a cache, ``lengths`` counts the real tokens
        of this call in each row (a ragged chunk); a ``KVCache`` still needs ``s`` free slots per row.
        """
        self._check_input(x, cache)
        segment_ids, lengths = self._check_packing(x, cache, segment_ids, lengths)
        dtype = x.dtype if self.dtype is None else self.dtype
        b, s, _ = x.shape
        h, kvh, d = self.num_heads, self.kv_heads, self.kv_dim_per_head
        def dense(features: int, name: str) -> nn.Dense:
            init = nn.linear.default_kernel_init
            if self.logical_partitioning:
                init = nn.with_logical_partitioning(init, PROJECTION_AXES[name])
            return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=self.param_dtype, name=name,
                            kernel_init=init)

        if self.use_sinks:  # read by op_options
            init = nn.initializers.zeros_init()
            if self.logical_partitioning:
                init = nn.with_logical_partitioning(init, PARAMETER_AXES["sinks"])
            self.param("sinks", init, (h,), self.param_dtype)
        q = dense(h * d, "q_proj")(x).reshape(b, s, h, d)
        k = dense(kvh * d, "k_proj")(x).reshape(b, s, kvh, d)
        v = dense(kvh * d, "v_proj")(x).reshape(b, s, kvh, d)
        if self.use_rope:
            positions = jnp.arange(s, dtype=jnp.int32)
            if cache is not None:
                positions = jnp.asarray(cache.length, jnp.int32)[:, None] + positions
            elif segment_ids is not None:
                positions = positions - segment_starts(segment_ids)
            q = apply_rope(q, positions, self.rope_theta)
            k = apply_rope(k, positions, self.rope_theta)
        if cache is None:
            out, new_cache = self.prefill(q, k, v, segment_ids, lengths)
        else:
            out, new_cache = self.continue_cache(cache, q, k, v, lengths)
        out = dense(self.hidden_size, "o_proj")(out.reshape(b, s, h * d))
        if lengths is not None:
            out = jnp.where(jnp.arange(s)[None, :, None] < lengths[:, None, None], out, jnp.zeros((), out.dtype))
        return out, new_cache

    def prefill(self, q, k, v, segment_ids=None, lengths=None) -> tuple[Array, Cache]:
        """Attention over whole rows (packed and/or ragged); returns the output and a cache that continues the last
        segment of each row (causal only; see ``__call__``)."""
        out = self.attend(q, k, v, **packing_options(segment_ids, lengths))
        if not self.causal:
            return out, None
        b, s = k.shape[:2]
        if segment_ids is not None:
            start, count = last_segment(segment_ids, lengths, s)
            k, v = shift_rows(k, start), shift_rows(v, start)
        else:
            count = lengths
        cache = self.new_cache(b, s, k.dtype, growable=True)
        return out, cache.append(k, v, count)

    # What each form defines.
    def attend(self, q, k, v, **packing):
        """Attention over a whole sequence, no cache; ``packing``: the ops' ``q_segment_ids`` and
        ``query_seq_lengths``/``key_value_seq_lengths`` where given."""
        raise NotImplementedError

    def new_cache(self, batch: int, length: int, dtype: Any, growable: bool) -> Cache:
        raise NotImplementedError

    def continue_cache(self, cache: Cache, q, k, v, valid=None) -> tuple[Array, Cache]:
        """Attention of new tokens against the cache and themselves; returns ``(out, updated cache)``. ``valid [b]``
        (default: all): the real tokens of each row, right padding after (their outputs are discarded)."""
        raise NotImplementedError


def packing_options(segment_ids, lengths) -> dict[str, Array]:
    """The ops' packing/padding keywords of a layer call (only those given)."""
    options = {}
    if segment_ids is not None:
        options["q_segment_ids"] = segment_ids
    if lengths is not None:
        options["query_seq_lengths"] = options["key_value_seq_lengths"] = lengths
    return options


def last_segment(segment_ids: Int[Array, "b s"], lengths: Optional[Int[Array, "b"]], s: int):
    """``(start [b], count [b])`` of the segment holding each row's last real token (``count`` 0 for an empty row)."""
    n = jnp.full((segment_ids.shape[0],), s, jnp.int32) if lengths is None else lengths
    last = jnp.clip(n - 1, 0, s - 1)
    start = jnp.take_along_axis(segment_starts(segment_ids), last[:, None], axis=1)[:, 0]
    start = jnp.where(n > 0, start, 0)
    return start, n - start


def shift_rows(x: Float[Array, "b s ..."], start: Int[Array, "b"]) -> Float[Array, "b s ..."]:
    """Row ``r`` moved left by ``start[r]`` positions (the tail repeats the last element)."""
    s = x.shape[1]
    index = jnp.clip(jnp.arange(s, dtype=jnp.int32)[None, :] + start[:, None], 0, s - 1)
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def _attend_ring(ring: RingCache, q, k, v, windows: tuple[int, ...], op_options: dict,
                 valid=None) -> tuple[Array, RingCache]:
    """``t`` new queries of heads with per-head ``windows`` (each <= the ring size) over ``ring`` and themselves.

    Returns the output and the ring with the new keys/values written (``valid [b]``: the real tokens of each row,
    right padding after: its outputs are garbage for the caller to discard, and it is not written). Each row is at
    its own length. One new token whose heads all see the whole ring: after writing it the ring holds exactly the
    positions it sees, in its first ``min(length, W)`` slots, and slot order does not matter (softmax is
    permutation-invariant), so the decode op reads the ring in place. Otherwise each row is rotated into position
    order (slot ``j`` then holds position ``length - filled + j``, ``filled = min(length, W)``) with the new keys
    right after the filled slots, so the decode op sees an ordinary linear cache of ``filled + t`` positions per row
    and applies each head's own window.
    """
    t = q.shape[1]
    w = ring.window
    new_ring = ring.append(k, v, valid)
    if t == 1 and all(window >= w for window in windows):
        filled = jnp.minimum(new_ring.length, w)
        return pk.decode_attention(q, new_ring.keys, new_ring.values, filled, windows, **op_options), new_ring

    filled = jnp.minimum(ring.length, w)  # [b]
    shift = jnp.where(ring.length >= w, jnp.mod(ring.length, w), 0)
    j = jnp.arange(w + t, dtype=jnp.int32)[None, :]
    from_ring = (j < filled[:, None])[:, :, None, None]
    ring_slot = jnp.mod(j + shift[:, None], w)[:, :, None, None]
    new_token = jnp.clip(j - filled[:, None], 0, t - 1)[:, :, None, None]

    def linear(buf, new):
        rolled = jnp.take_along_axis(buf, ring_slot, axis=1)
        fresh = jnp.take_along_axis(new.astype(buf.dtype), new_token, axis=1)
        return jnp.where(from_ring, rolled, fresh)

    out = pk.decode_attention(q, linear(ring.keys, k), linear(ring.values, v), filled + t, windows, **op_options)
    return out, new_ring


class _KVCacheAttention(Attention):
    """Forms whose cache keeps every key/value: flash and sparse (multi-scale keeps them for its global heads)."""

    def new_cache(self, batch, length, dtype, growable):
        return KVCache.zeros(batch, length, self.kv_heads, self.kv_dim_per_head, dtype, growable)

    def continue_cache(self, cache, q, k, v, valid=None):
        t = q.shape[1]
        old = cache.length
        cache = cache.append(k, v, valid)
        # Each row's filled slots including all t new ones (padding included: it comes after every real query, so
        # no real query sees it); clipped where an overflow under jit skipped the write (outputs then invalid).
        lengths = jnp.minimum(jnp.asarray(old, jnp.int32) + t, cache.capacity)
        q_pos, k_pos = pk.reference.cache_positions(lengths, t, cache.capacity)
        return self.attend_cached(q, cache, lengths, q_pos, k_pos), cache

    def attend_cached(self, q, cache: KVCache, lengths, q_pos, k_pos):
        raise NotImplementedError


class FlashAttention(_KVCacheAttention):
    """Softmax attention over every earlier token (causal) or every token (``causal=False``)."""

    def attend(self, q, k, v, **packing):
        return pk.flash_attention(q, k, v, causal=self.causal, **packing, **self.op_options)

    def attend_cached(self, q, cache, lengths, q_pos, k_pos):
        return pk.decode_attention(q, cache.keys, cache.values, lengths, **self.op_options)


class SlidingWindowAttention(Attention):
    """Mistral-style sliding window: token i sees j iff ``0 <= i - j < window_size``; the cache is a ring of W."""

    window_size: int = 4096

    def validate(self) -> None:
        super().validate()
        check_positive(window_size=self.window_size)

    def attend(self, q, k, v, **packing):
        return pk.flash_attention(q, k, v, causal=self.causal, window_size=self.window_size,
                                  **packing, **self.op_options)

    def new_cache(self, batch, length, dtype, growable):
        return RingCache.zeros(batch, self.window_size, self.kv_heads, self.kv_dim_per_head, dtype)

    def continue_cache(self, cache: RingCache, q, k, v, valid=None):
        return _attend_ring(cache, q, k, v, (self.window_size,) * self.num_heads, self.op_options, valid)


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

    def attend(self, q, k, v, **packing):
        return pk.sparse_attention(
            q, k, v, self.block_size, self.num_global_tokens, self.num_local_blocks,
            self.num_random_blocks, self.seed, self.causal, **packing, **self.op_options,
        )

    def attend_cached(self, q, cache, lengths, q_pos, k_pos):
        # The decode op draws the random blocks for cdiv(capacity, block_size) query blocks, as the prefill did.
        return pk.decode_attention(q, cache.keys.astype(q.dtype), cache.values.astype(q.dtype), lengths,
                                   sparse_mask=self.mask, **self.op_options)


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

    def attend(self, q, k, v, **packing):
        return pk.multiscale_attention(q, k, v, self.head_windows, causal=self.causal, **packing,
                                       **self.op_options)

    def new_cache(self, batch, length, dtype, growable):
        return MultiScaleCache.zeros(batch, length, self.cache_layout, self.kv_dim_per_head, dtype, growable)

    def continue_cache(self, cache: MultiScaleCache, q, k, v, valid=None):
        layout = self.cache_layout
        options = self.op_options
        outs, new_full, new_rings = [], None, []
        for part, part_cache in zip(layout, cache.part_caches()):
            qp = q[:, :, part.q_start:part.q_stop]
            kp = k[:, :, part.kv_start:part.kv_stop]
            vp = v[:, :, part.kv_start:part.kv_stop]
            part_options = dict(options)
            if "sinks" in options:  # one per query head: this part's
                part_options["sinks"] = options["sinks"][part.q_start:part.q_stop]
            if part.ring is None:
                new_full = part_cache.append(kp, vp, valid)
                # As in _KVCacheAttention.continue_cache: the filled slots including the t new ones.
                lengths = jnp.minimum(jnp.asarray(part_cache.length, jnp.int32) + q.shape[1], new_full.capacity)
                outs.append(pk.decode_attention(qp, new_full.keys, new_full.values, lengths, part.windows,
                                                **part_options))
            else:
                out, ring = _attend_ring(part_cache, qp, kp, vp, part.windows, part_options, valid)
                outs.append(out)
                new_rings.append(ring)
        out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
        return out, cache.replace(full=new_full, rings=tuple(new_rings))


class LinearAttention(Attention):
    """Katharopoulos et al. 2020 linear attention; the cache is the ``O(1)`` recurrent state."""

    use_rope: bool = False
    feature_map: str = "elu"

    def validate(self) -> None:
        for name, value, default in (("logits_soft_cap", self.logits_soft_cap, None),
                                     ("use_sinks", self.use_sinks, False)):
            if value is not default:
                raise ValueError(
                    f"{name} applies to the softmax forms; linear attention has no softmax, so it must stay"
                    f" {default!r}, got {value!r}"
                )
        super().validate()
        check_choice("feature_map", self.feature_map, FEATURE_MAPS)

    def prefill(self, q, k, v, segment_ids=None, lengths=None):
        # The op restarts the state at each segment start and returns the state after each row's last real token:
        # the state of the row's last segment, which the cache continues (see Attention.__call__).
        out, state = pk.linear_attention(q, k, v, self.feature_map, self.causal,
                                         **packing_options(segment_ids, lengths), **self.op_options)
        if not self.causal:
            return out, None
        b, s = q.shape[:2]
        if segment_ids is not None:
            count = last_segment(segment_ids, lengths, s)[1]
        else:
            count = jnp.full((b,), s, jnp.int32) if lengths is None else lengths
        return out, LinearCache(state, count)

    def new_cache(self, batch, length, dtype, growable):
        return LinearCache(pk.reference.zero_linear_state(batch, self.kv_heads, self.kv_dim_per_head),
                           jnp.zeros((batch,), jnp.int32))

    def continue_cache(self, cache: LinearCache, q, k, v, valid=None):
        out, state = pk.linear_attention(q, k, v, self.feature_map, True, cache.state,
                                         **packing_options(None, valid), **self.op_options)
        added = q.shape[1] if valid is None else valid
        return out, LinearCache(state, cache.length + added)
