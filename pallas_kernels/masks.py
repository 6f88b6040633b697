"""Which keys each query sees: the one place where attention masks are defined.

Every softmax form (flash, sliding window, multi-scale, block-sparse, decode) is a mask over absolute
positions. A mask answers ``visible(q_pos, k_pos)`` elementwise; positions below zero mark empty cache
slots and are never visible. The XLA path evaluates these masks densely; the Pallas kernels use the
same rules block by block.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Int

# Stands for "no window" where a window must be a number (kernels, per-head tables).
UNLIMITED_WINDOW = 2**30


@dataclasses.dataclass(frozen=True)
class WindowMask:
    """Causal and/or sliding-window visibility, one window per query head.

    Causal: ``0 <= i - j < W_h``. Non-causal: ``|i - j| < W_h``. ``W_h = None`` means unlimited.
    """

    windows: tuple[int | None, ...]
    causal: bool = True

    @property
    def num_heads(self) -> int:
        return len(self.windows)

    def heads(self, start: int, count: int) -> WindowMask:
        """The mask of query heads ``[start, start + count)`` (a device holding a slice of the heads)."""
        return WindowMask(self.windows[start:start + count], self.causal)

    @property
    def differs_between_heads(self) -> bool:
        """Whether heads have different windows (multi-scale): a device holding some heads needs their windows."""
        return len(set(self.windows)) > 1

    def window_array(self) -> np.ndarray:
        """int32 ``[heads]`` windows, ``UNLIMITED_WINDOW`` for ``None``."""
        return np.array([UNLIMITED_WINDOW if w is None else w for w in self.windows], np.int32)

    def visible(
        self, q_pos: Int[Array, "*b q"], k_pos: Int[Array, "*b k"]
    ) -> Bool[Array, "*b heads q k"]:
        q_pos = q_pos[..., None, :, None]
        k_pos = k_pos[..., None, None, :]
        distance = q_pos - k_pos
        window = jnp.asarray(self.window_array())[:, None, None]
        if self.causal:
            seen = (distance >= 0) & (distance < window)
        else:
            seen = jnp.abs(distance) < window
        return seen & (k_pos >= 0)


class Segments(NamedTuple):
    """Packed sequences and padding of one call, as per-position segment ids: query row ``r`` of batch row ``b`` sees
    key ``j`` only if ``q[b, r] == kv[b, j]`` (besides the form's own mask).

    User ids are non-negative; ``segments`` folds the sequence lengths in by giving padding queries ``PAD_QUERY`` and
    padding keys ``PAD_KEY``, which match nothing, so one rule serves packing and padding.
    """

    q: Int[Array, "b sq"]
    kv: Int[Array, "b sk"]

    def visible(self) -> Bool[Array, "b 1 sq sk"]:
        return (self.q[:, :, None] == self.kv[:, None, :])[:, None]


PAD_QUERY = -1
PAD_KEY = -2


def segment_starts(segment_ids: Int[Array, "b s"]) -> Int[Array, "b s"]:
    """The position where each token's segment starts: a segment is a run of equal ids, so a new one starts wherever
    the id changes (an id that comes back after another one starts a new segment)."""
    index = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)[None, :]
    changed = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return lax.cummax(jnp.where(changed, index, 0), axis=1)


def segments(
    q_segment_ids: Int[Array, "b sq"] | None,
    kv_segment_ids: Int[Array, "b sk"] | None,
    query_seq_lengths: Int[Array, "b"] | None,
    key_value_seq_lengths: Int[Array, "b"] | None,
    batch: int,
    q_len: int,
    kv_len: int,
) -> Segments | None:
    """The ``Segments`` of the ops' packing/padding arguments (checked here), ``None`` when none is given.

    ``kv_segment_ids`` defaults to ``q_segment_ids`` when ``q_len == kv_len``; rows at or past a length get the
    padding ids.
    """
    from pallas_kernels._validation import check_segment_ids, check_seq_lengths

    if q_segment_ids is None and kv_segment_ids is None and query_seq_lengths is None and key_value_seq_lengths is None:
        return None
    if (q_segment_ids is None) != (kv_segment_ids is None) and (q_segment_ids is None or q_len != kv_len):
        raise ValueError(
            "q_segment_ids and kv_segment_ids must be given together unless q_len == kv_len (kv_segment_ids then"
            f" defaults to q_segment_ids); got q_segment_ids={'None' if q_segment_ids is None else 'an array'},"
            f" kv_segment_ids={'None' if kv_segment_ids is None else 'an array'}, q_len={q_len}, kv_len={kv_len}"
        )
    if q_segment_ids is None:
        q_ids, kv_ids = jnp.zeros((batch, q_len), jnp.int32), jnp.zeros((batch, kv_len), jnp.int32)
    else:
        q_ids = check_segment_ids("q_segment_ids", q_segment_ids, batch, q_len)
        kv_ids = q_ids if kv_segment_ids is None else check_segment_ids("kv_segment_ids", kv_segment_ids, batch,
                                                                       kv_len)
    if query_seq_lengths is not None:
        lengths = check_seq_lengths("query_seq_lengths", query_seq_lengths, batch, q_len)
        q_ids = jnp.where(jnp.arange(q_len, dtype=jnp.int32) < lengths[:, None], q_ids, PAD_QUERY)
    if key_value_seq_lengths is not None:
        lengths = check_seq_lengths("key_value_seq_lengths", key_value_seq_lengths, batch, kv_len)
        kv_ids = jnp.where(jnp.arange(kv_len, dtype=jnp.int32) < lengths[:, None], kv_ids, PAD_KEY)
    return Segments(q_ids, kv_ids)


@dataclasses.dataclass(frozen=True)
class SparseMask:
    """BigBird/Longformer block-sparse visibility (see ``sparse_mask`` for the rules)."""

    num_heads: int
    block_size: int = 64
    num_global_tokens: int = 1
    num_local_blocks: int = 3
    num_random_blocks: int = 3
    seed: int = 0
    causal: bool = True
    # Global index of head 0: a device holding heads [first_head, first_head + num_heads) of a sharded call draws
    # the random blocks of those global heads.
    first_head: int = 0

    def heads(self, start: int, count: int) -> SparseMask:
        """The mask of heads ``[start, start + count)`` of this one."""
        return dataclasses.replace(self, num_heads=count, first_head=self.first_head + start)

    @property
    def differs_between_heads(self) -> bool:
        """Whether heads see different keys: only the random blocks are drawn per head."""
        return self.num_random_blocks > 0

    def random_blocks(self, num_blocks: int) -> np.ndarray:
        """int32 ``[heads, num_blocks, num_random_blocks]``: the random key blocks of each query block.

        Causal: drawn among the earlier blocks outside the local band, so a query block's draw never
        depends on the sequence length. Non-causal: drawn among all blocks outside the local band of the
        sequence (the set, hence the draw, depends on ``num_blocks``). Fewer candidates than requested
        gives all of them; unused slots hold -1.
        """
        return _random_block_table(
            self.num_heads, num_blocks, self.num_local_blocks, self.num_random_blocks, self.seed,
            self.causal, self.first_head,
        )

    def visible(
        self, q_pos: Int[Array, "*b q"], k_pos: Int[Array, "*b k"], num_blocks: int
    ) -> Bool[Array, "*b heads q k"]:
        """``num_blocks`` (static) must cover every query position: ``max(q_pos) < num_blocks * block_size``."""
        table = jnp.asarray(self.random_blocks(num_blocks))  # [h, nb, r]
        qb = q_pos // self.block_size
        kb = k_pos // self.block_size
        q_pos, k_pos = q_pos[..., None, :, None], k_pos[..., None, None, :]
        qb4, kb4 = qb[..., None, :, None], kb[..., None, None, :]
        if self.causal:
            local = (qb4 - kb4) < self.num_local_blocks
        else:
            local = jnp.abs(qb4 - kb4) <= self.num_local_blocks // 2
        is_global = (k_pos < self.num_global_tokens) | (q_pos < self.num_global_tokens)
        rand_of_q = jnp.take(table, jnp.clip(qb, 0, num_blocks - 1), axis=1)  # [h, *b, q, r]
        rand_of_q = jnp.moveaxis(rand_of_q, 0, -3)  # [*b, h, q, r]
        is_random = jnp.any(rand_of_q[..., :, :, None, :] == kb4[..., None], axis=-1)
        seen = local | is_global | is_random
        if self.causal:
            seen &= k_pos <= q_pos
        return seen & (k_pos >= 0)


@functools.lru_cache(maxsize=64)
def _random_block_table(
    num_heads: int, num_blocks: int, num_local_blocks: int, num_random_blocks: int, seed: int,
    causal: bool, first_head: int = 0,
) -> np.ndarray:
    table = np.full((num_heads, num_blocks, num_random_blocks), -1, np.int32)
    if num_random_blocks == 0:
        return table
    for h in range(num_heads):
        for qb in range(num_blocks):
            if causal:
                candidates = np.arange(0, max(qb - num_local_blocks + 1, 0))
            else:
                band = num_local_blocks // 2
                all_blocks = np.arange(num_blocks)
                candidates = all_blocks[np.abs(all_blocks - qb) > band]
            if candidates.size == 0:
                continue
            rng = np.random.default_rng([seed, first_head + h, qb, num_local_blocks, num_random_blocks])
            take = min(num_random_blocks, candidates.size)
            table[h, qb, :take] = np.sort(rng.choice(candidates, size=take, replace=False))
    table.setflags(write=False)
    return table


def sparse_mask(
    seq_len: int,
    num_heads: int,
    block_size: int = 64,
    num_global_tokens: int = 1,
    num_local_blocks: int = 3,
    num_random_blocks: int = 3,
    seed: int = 0,
    causal: bool = True,
) -> Bool[np.ndarray, "heads seq seq"]:
    """The exact BigBird-style mask used by ``sparse_attention`` and ``CUDA.sparse``.

    With ``bi = i // block_size``, key j is visible to query i iff (causal) ``j <= i`` and one of: the
    local band ``bi - bj < num_local_blocks``; a global column ``j < num_global_tokens``; a global row
    ``i < num_global_tokens``; ``bj`` one of the random blocks drawn for ``(bi, head)`` from ``seed``.
    Non-causal: band ``|bi - bj| <= num_local_blocks // 2``, global rows/columns, random blocks from all
    blocks. Causal masks are prefix-consistent: ``sparse_mask(S)[:, :s, :s] == sparse_mask(s)``.
    """
    from pallas_kernels._validation import check_sparse_config, check_positive

    check_positive(seq_len=seq_len, num_heads=num_heads)
    config = SparseMask(num_heads, block_size, num_global_tokens, num_local_blocks,
                        num_random_blocks, seed, causal)
    check_sparse_config(config)
    pos = np.arange(seq_len)
    num_blocks = -(-seq_len // block_size)
    return np.asarray(config.visible(jnp.asarray(pos), jnp.asarray(pos), num_blocks))
