"""Block ranges of window masks, computed inside the kernels (traced int32 scalars): which tiles of the looped axis
a program's tile must visit, and which of them need no element mask. Shared by every backend (Triton, Mosaic GPU).

Query row ``r`` sits at absolute position ``r + offset`` with ``offset = kv_len - q_len``; key ``j`` is visible to the
query at ``i`` iff ``0 <= i - j < W`` (causal) or ``|i - j| < W`` (non-causal), ``W`` the head's window
(``masks.UNLIMITED_WINDOW`` when it has none).
"""

from __future__ import annotations

from collections.abc import Callable
import math
from typing import NamedTuple

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Int


_LOG2E = math.log2(math.e)


class Geometry(NamedTuple):
    """Trace-time constants of one attention call: real lengths, head size, mask kind, score scale and soft-cap
    (``fast_tanh``: the kernels may evaluate the soft-cap's tanh with the hardware approximation)."""

    q_len: int
    kv_len: int
    head_dim: int
    causal: bool
    softmax_scale: float
    logits_soft_cap: float | None = None
    fast_tanh: bool = False

    @property
    def offset(self) -> int:
        """Absolute position of query row 0."""
        return self.kv_len - self.q_len

    @property
    def qk_scale(self) -> float:
        """Score scale in the base-2 domain: ``exp(scale * x) == exp2(qk_scale * x)``."""
        return self.softmax_scale * _LOG2E


class Phase(NamedTuple):
    """Loop counters ``[start, stop)`` and the block each one visits."""

    start: Int[Array, ""]
    stop: Int[Array, ""]
    block: Callable[[Int[Array, ""]], Int[Array, ""]]


class BlockRange(NamedTuple):
    """Blocks ``[lo, hi)`` contain every visible element; blocks ``[full_lo, full_hi)`` are entirely visible."""

    lo: Int[Array, ""]
    full_lo: Int[Array, ""]
    full_hi: Int[Array, ""]
    hi: Int[Array, ""]

    def intersect(self, other: BlockRange) -> BlockRange:
        """The blocks both ranges visit; entirely visible where both say so."""
        lo = jnp.maximum(self.lo, other.lo)
        hi = jnp.maximum(jnp.minimum(self.hi, other.hi), lo)
        full_lo = jnp.minimum(jnp.maximum(jnp.maximum(self.full_lo, other.full_lo), lo), hi)
        full_hi = jnp.minimum(jnp.maximum(jnp.minimum(self.full_hi, other.full_hi), full_lo), hi)
        return BlockRange(lo, full_lo, full_hi, hi)

    def phases(self) -> tuple[Phase, Phase]:
        """The full blocks, then the partial ones on both sides of them."""
        n_before = self.full_lo - self.lo
        return (
            Phase(self.full_lo, self.full_hi, lambda t: t),
            Phase(
                0,
                n_before + self.hi - self.full_hi,
                lambda t: jnp.where(t < n_before, self.lo + t, self.full_hi + (t - n_before)),
            ),
        )


def int_div(x: Int[Array, ""], divisor: int) -> Int[Array, ""]:
    """``x // divisor`` for ``x >= 0``: one truncating ``lax.div`` in ``x``'s integer dtype (a bare Python ``divisor``
    would be int64 under ``jax_enable_x64``, which ``lax.div`` refuses beside an int32 ``x``)."""
    return lax.div(x, jnp.asarray(divisor, jnp.result_type(x)))


def offset_bounds(window: Int[Array, ""], causal: bool) -> tuple[Int[Array, ""], Int[Array, ""]]:
    """Visible ``i - j`` lies in ``[d_min, d_max]``."""
    return (0 if causal else 1 - window), window - 1


def block_range(any_lo, any_hi, all_lo, all_hi, length: int, block: int) -> BlockRange:
    """Blocks of the looped axis (``length`` positions, tiles of ``block``) given inclusive position intervals.

    ``[any_lo, any_hi]``: positions visible to SOME element of the program's tile; ``[all_lo, all_hi]``: visible to
    ALL of them. Only in-bounds blocks count as entirely visible, so ragged tails land in the masked phase.
    """
    last = length - 1
    lo = int_div(jnp.maximum(any_lo, 0), block)
    hi = jnp.maximum(int_div(jnp.maximum(jnp.minimum(any_hi, last) + 1, 0) + block - 1, block), lo)
    full_lo = int_div(jnp.maximum(all_lo, 0) + block - 1, block)
    full_hi = int_div(jnp.maximum(jnp.minimum(all_hi, last) + 1, 0), block)
    full_lo = jnp.minimum(jnp.maximum(full_lo, lo), hi)
    full_hi = jnp.minimum(jnp.maximum(full_hi, full_lo), hi)
    return BlockRange(lo, full_lo, full_hi, hi)


def kv_block_range(q_first, q_last, window, st: Geometry, block_k: int) -> BlockRange:
    """Key blocks seen by the query positions ``[q_first, q_last]`` (absolute positions)."""
    d_min, d_max = offset_bounds(window, st.causal)
    return block_range(q_first - d_max, q_last - d_min, q_last - d_max, q_first - d_min, st.kv_len, block_k)


def q_block_range(k_first, k_last, window, st: Geometry, block_q: int) -> BlockRange:
    """Query-row blocks that see the key positions ``[k_first, k_last]``."""
    d_min, d_max = offset_bounds(window, st.causal)
    r = -st.offset  # absolute position -> query row
    return block_range(k_first + d_min + r, k_last + d_max + r, k_last + d_min + r, k_first + d_max + r, st.q_len, block_q)


def segment_block_ranges(
    q_ids: Int[Array, "b sq"], kv_ids: Int[Array, "b sk"], block_q: int, block_k: int, *, by_key: bool
) -> Int[Array, "b tiles 4"]:
    """Per batch row and tile of the program axis, the ``BlockRange`` ``(lo, full_lo, full_hi, hi)`` of the looped
    axis under segment ids alone (computed by XLA, read by the kernels; ``masks.Segments`` for the ids).

    Query tiles (key tiles if ``by_key``) own the programs. A pair of tiles may hold a visible element when the id
    intervals ``[min, max]`` of the two tiles overlap, and is entirely visible when both tiles hold one and the same
    id: a superset of the visible tiles for any ids, tight for contiguous runs. ``[lo, hi)`` spans the first to the
    last pair that may be visible; ``[full_lo, full_hi)`` is the first run of entirely visible ones.
    """
    q_lo, q_hi = _tile_id_bounds(q_ids, block_q)  # [b, nq]
    k_lo, k_hi = _tile_id_bounds(kv_ids, block_k)  # [b, nk]
    if by_key:
        (own_lo, own_hi), (loop_lo, loop_hi) = (k_lo, k_hi), (q_lo, q_hi)
    else:
        (own_lo, own_hi), (loop_lo, loop_hi) = (q_lo, q_hi), (k_lo, k_hi)
    own_lo, own_hi = own_lo[:, :, None], own_hi[:, :, None]
    loop_lo, loop_hi = loop_lo[:, None, :], loop_hi[:, None, :]
    maybe = (own_lo <= loop_hi) & (loop_lo <= own_hi)  # [b, own tiles, looped tiles]
    full = (own_lo == own_hi) & (loop_lo == loop_hi) & (own_lo == loop_lo)
    n = maybe.shape[-1]
    tiles = jnp.arange(n, dtype=jnp.int32)
    lo = jnp.min(jnp.where(maybe, tiles, n), axis=-1)
    hi = jnp.maximum(jnp.max(jnp.where(maybe, tiles + 1, 0), axis=-1), lo)
    full_lo = jnp.min(jnp.where(full, tiles, n), axis=-1)
    full_hi = jnp.min(jnp.where(~full & (tiles > full_lo[..., None]), tiles, n), axis=-1)
    full_lo = jnp.clip(full_lo, lo, hi)
    full_hi = jnp.clip(full_hi, full_lo, hi)
    return jnp.stack([lo, full_lo, full_hi, hi], axis=-1).astype(jnp.int32)


def _tile_id_bounds(ids: Int[Array, "b s"], block: int) -> tuple[Int[Array, "b n"], Int[Array, "b n"]]:
    """Smallest and largest id of each tile of ``block`` positions (the ragged last tile over its real positions)."""
    b, length = ids.shape
    n = -(-length // block)
    pad = n * block - length
    low = jnp.pad(ids, ((0, 0), (0, pad)), constant_values=jnp.iinfo(jnp.int32).max).reshape(b, n, block)
    high = jnp.pad(ids, ((0, 0), (0, pad)), constant_values=jnp.iinfo(jnp.int32).min).reshape(b, n, block)
    return low.min(axis=-1), high.max(axis=-1)
