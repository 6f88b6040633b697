"""Element masks of one tile inside the Triton kernels, shared by the sequence kernels (``softmax.py``) and the decode
kernel (``decode.py``): the same rules as ``masks.py``, evaluated on the positions of a tile's rows and columns.

Positions stay below ``2**30`` (``masks.UNLIMITED_WINDOW``), so a pair of bounds can be tested with one unsigned
comparison (``below``), which halves the mask work of the partial tiles.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Bool, Int

from pallas_kernels.block_ranges import int_div
from pallas_kernels.block_tables import band
from pallas_kernels.masks import SparseMask


def below(x: Int[Array, "..."], bound) -> Bool[Array, "..."]:
    """``0 <= x < bound`` for int32 ``x`` and a positive ``bound``, as one unsigned comparison."""
    return x.astype(jnp.uint32) < jnp.asarray(bound).astype(jnp.uint32)


def per_query(x: Array, keys_first: bool) -> Array:
    """A per-query vector shaped to broadcast over a ``[queries, keys]`` tile, or ``[keys, queries]``."""
    return x[None, :] if keys_first else x[:, None]


def per_key(x: Array, keys_first: bool) -> Array:
    return x[:, None] if keys_first else x[None, :]


class SparseRows(NamedTuple):
    """``masks.SparseMask.visible`` for a tile of query rows: per row, the key positions ``[band_lo, band_hi)`` of
    its local band and the first key of each of its random blocks (an unused slot starts at ``-2**30``: no key is
    in it, and ``j - start`` stays below ``2**31``). Keys at or past ``kv_len`` are never visible."""

    q_pos: Int[Array, " rows"]
    band_lo: Int[Array, " rows"]
    band_hi: Int[Array, " rows"]
    random: tuple[Int[Array, " rows"], ...]
    sparse: SparseMask
    kv_len: int

    @classmethod
    def at(cls, q_pos: Int[Array, " rows"], random: tuple[Int[Array, " rows"], ...], sparse: SparseMask,
           kv_len: int) -> SparseRows:
        """The rows at absolute positions ``q_pos`` (``>= 0``, or masked out by causality) with their random
        blocks' starts."""
        q_block = int_div(q_pos, sparse.block_size)
        before, after = band(sparse)
        return cls(q_pos, (q_block - before) * sparse.block_size, (q_block + after + 1) * sparse.block_size, random,
                   sparse, kv_len)

    def visible(self, k_pos: Int[Array, " cols"], keys_first: bool = False) -> Bool[Array, "..."]:
        """``[rows, cols]``, or ``[cols, rows]`` if ``keys_first``."""
        rows = functools.partial(per_query, keys_first=keys_first)
        j, bs, n_global = per_key(k_pos, keys_first), self.sparse.block_size, self.sparse.num_global_tokens
        seen = below(j - rows(self.band_lo), rows(self.band_hi - self.band_lo))
        if n_global:
            seen |= (j < n_global) | (rows(self.q_pos) < n_global)
        for start in self.random:
            seen |= below(j - rows(start), bs)
        if self.sparse.causal:
            seen &= j <= rows(self.q_pos)
        return seen & (j < self.kv_len) if self.kv_len % k_pos.shape[0] else seen
