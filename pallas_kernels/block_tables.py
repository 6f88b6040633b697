"""Block tables of a ``SparseMask``: which (query tile, key tile) pairs of a kernel hold visible elements.

Host-side numpy, computed once per configuration (cached). Tiles are ``block_q`` query rows by ``block_k`` keys;
query row ``r`` sits at absolute position ``r + kv_len - q_len``. A tile pair is FULL when both tiles lie inside
their sequences and every element is visible (the kernel needs no element mask), PARTIAL when it holds some visible
element but is not FULL (causal diagonal, band edges, global rows/columns, ragged tails). Pairs are found rule by
rule (band by block index, global rows/columns in the first blocks, random blocks whole) and classified exactly from
the mask blocks crossing each tile pair, never from a dense ``[S, S]`` mask.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
from jaxtyping import Bool, Int

from pallas_kernels.masks import SparseMask


class BlockTable(NamedTuple):
    """For each (head, row tile) the tiles of the other axis that hold a visible element, FULL ones first.

    ``bounds[h, t] = (start, full_end, end)``: ``blocks[start:full_end]`` are the FULL tiles of row tile ``t`` of head
    ``h``, ``blocks[full_end:end]`` its PARTIAL ones, each run ascending. Rows are stored head-major, back to back
    (compressed rows: a fixed-width table would be ``O(tiles^2)`` since a global row or column sees every tile).
    """

    bounds: Int[np.ndarray, "heads row_tiles 3"]
    blocks: Int[np.ndarray, " entries"]


class RowPieces(NamedTuple):
    """Long rows of a ``BlockTable`` cut into pieces of at most ``length`` entries, so that no program of a kernel
    that owns one row tile (and loops over its entries) runs far longer than the others.

    Piece ``p`` of row tile ``t`` covers entries ``[start + p * length, start + (p + 1) * length)`` of every head's row
    ``t``, clipped to it. Piece 0 of every row tile is implied; ``tiles[n], parts[n]`` list the others (``parts >= 1``).
    """

    length: int
    tiles: Int[np.ndarray, " extra"]
    parts: Int[np.ndarray, " extra"]


class BlockTables(NamedTuple):
    """The same tile pairs indexed both ways (a pair is FULL or PARTIAL in both)."""

    by_query: BlockTable  # rows: query tiles; entries: key tiles (forward and dQ)
    by_key: BlockTable  # rows: key tiles; entries: query tiles (dK/dV)


def band(mask: SparseMask) -> tuple[int, int]:
    """``(before, after)``: key block ``bj`` is in the local band of query block ``bi`` iff
    ``bi - before <= bj <= bi + after`` (causal: exact together with ``j <= i``)."""
    if mask.causal:
        return mask.num_local_blocks - 1, 0
    return mask.num_local_blocks // 2, mask.num_local_blocks // 2


@functools.lru_cache(maxsize=32)
def block_tables(mask: SparseMask, q_len: int, kv_len: int, block_q: int, block_k: int) -> BlockTables:
    """The block tables of ``mask`` for ``q_len`` queries (the last positions) over ``kv_len`` keys."""
    if not 0 < q_len <= kv_len:
        raise ValueError(f"need 0 < q_len <= kv_len (queries are the last positions), got {q_len}, {kv_len}")
    n_qt, n_kt = -(-q_len // block_q), -(-kv_len // block_k)
    head, qt, kt = _candidate_pairs(mask, q_len, kv_len, block_q, block_k)
    seen, full = _classify(mask, q_len, kv_len, block_q, block_k, head, qt, kt)
    head, qt, kt, full = head[seen], qt[seen], kt[seen], full[seen]
    return BlockTables(
        _compress(head, qt, kt, full, mask.num_heads, n_qt), _compress(head, kt, qt, full, mask.num_heads, n_kt)
    )


def split_long_rows(table: BlockTable, factor: int = 4) -> RowPieces:
    """Pieces of ``factor`` times the mean row length (over heads and rows); rows up to twice that stay whole.

    A causal global column is seen by every query tile, so its key tile's row is ``O(tiles)`` long while the others
    hold a handful of entries: unsplit, that one program is the tail of the whole dK/dV pass.
    """
    lengths = table.bounds[..., 2] - table.bounds[..., 0]
    length = max(1, factor * int(np.ceil(lengths.mean())))
    longest = lengths.max(axis=0)
    n_pieces = np.where(longest > 2 * length, -(-longest // length), 1)
    tiles, parts = _spread(np.arange(n_pieces.size), 1, n_pieces - 1)
    return RowPieces(length, tiles.astype(np.int32), parts.astype(np.int32))


def _spread(owner: np.ndarray, first: np.ndarray, last: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(owner[n], x)`` for every ``x`` in ``[first[n], last[n]]`` (none where ``last < first``)."""
    owner, first, last = np.broadcast_arrays(owner, first, last)
    counts = np.maximum(last - first + 1, 0)
    shift = np.repeat(first - (np.cumsum(counts) - counts), counts)
    return np.repeat(owner, counts), shift + np.arange(counts.sum())


def _query_span(qt: np.ndarray, q_len: int, kv_len: int, block_q: int) -> tuple[np.ndarray, np.ndarray]:
    """Absolute positions of the first and last real row of query tiles ``qt``."""
    offset = kv_len - q_len
    return qt * block_q + offset, np.minimum(qt * block_q + block_q, q_len) - 1 + offset


def _candidate_pairs(
    mask: SparseMask, q_len: int, kv_len: int, block_q: int, block_k: int
) -> tuple[Int[np.ndarray, " pairs"], Int[np.ndarray, " pairs"], Int[np.ndarray, " pairs"]]:
    """``(head, query tile, key tile)``: a superset of the pairs holding a visible element, without repeats."""
    bs, n_global, heads = mask.block_size, mask.num_global_tokens, mask.num_heads
    n_kt = -(-kv_len // block_k)
    qt = np.arange(-(-q_len // block_q))
    first, last = _query_span(qt, q_len, kv_len, block_q)

    # Band, global columns and global rows select the same key tiles for every head.
    before, after = band(mask)
    band_first = np.maximum(first // bs - before, 0) * bs
    band_last = np.minimum((last // bs + after + 1) * bs, kv_len) - 1
    spans = [_spread(qt, band_first // block_k, band_last // block_k)]
    if n_global:
        spans.append(_spread(qt, 0, (min(n_global, kv_len) - 1) // block_k))
        spans.append(_spread(qt[first < n_global], 0, n_kt - 1))
    shared_qt, shared_kt = (np.concatenate(x) for x in zip(*spans))
    hs = [np.repeat(np.arange(heads), shared_qt.size)]
    qts, kts = [np.tile(shared_qt, heads)], [np.tile(shared_kt, heads)]

    # Random blocks: those drawn for each mask block crossing the query tile, per head.
    random = mask.random_blocks(-(-kv_len // bs))  # [heads, num_blocks, r]
    if random.shape[2]:
        tile_of, q_block = _spread(qt, first // bs, last // bs)
        grid = np.meshgrid(np.arange(heads), np.arange(q_block.size), np.arange(random.shape[2]), indexing="ij")
        h, n, slot = (x.ravel() for x in grid)
        key_block = random[h, q_block[n], slot]
        used = key_block >= 0
        h, n, key_block = h[used], n[used], key_block[used]
        owner, kt = _spread(
            np.arange(h.size), key_block * bs // block_k, (np.minimum(key_block * bs + bs, kv_len) - 1) // block_k
        )
        hs.append(h[owner])
        qts.append(tile_of[n[owner]])
        kts.append(kt)

    n_qt = qt.size
    key = (np.concatenate(hs) * n_qt + np.concatenate(qts)) * n_kt + np.concatenate(kts)
    key = np.unique(key)
    return key // (n_qt * n_kt), key // n_kt % n_qt, key % n_kt


def _classify(
    mask: SparseMask,
    q_len: int,
    kv_len: int,
    block_q: int,
    block_k: int,
    head: Int[np.ndarray, " pairs"],
    qt: Int[np.ndarray, " pairs"],
    kt: Int[np.ndarray, " pairs"],
) -> tuple[Bool[np.ndarray, " pairs"], Bool[np.ndarray, " pairs"]]:
    """Whether each tile pair holds a visible element, and whether it is FULL.

    A tile pair splits into cells, one per (query mask block, key mask block) crossing it; in a cell the band and
    random rules are constant, so only causality and the global rows/columns vary, and both are monotone.
    """
    bs, n_global = mask.block_size, mask.num_global_tokens
    random = mask.random_blocks(-(-kv_len // bs))
    before, after = band(mask)
    i_first, i_last = _query_span(qt, q_len, kv_len, block_q)
    j_first, j_last = kt * block_k, np.minimum(kt * block_k + block_k, kv_len) - 1
    seen = np.zeros(qt.shape, bool)
    full = ((qt + 1) * block_q <= q_len) & ((kt + 1) * block_k <= kv_len)
    for a in range((block_q - 1) // bs + 2):  # the most mask blocks a tile can cross
        bi = i_first // bs + a
        a0, a1 = np.maximum(i_first, bi * bs), np.minimum(i_last, bi * bs + bs - 1)
        random_of_bi = random[head, np.minimum(bi, random.shape[1] - 1)]  # [pairs, r]
        for c in range((block_k - 1) // bs + 2):
            bj = j_first // bs + c
            c0, c1 = np.maximum(j_first, bj * bs), np.minimum(j_last, bj * bs + bs - 1)
            cell = (a0 <= a1) & (c0 <= c1)
            whole = ((bi - before <= bj) & (bj <= bi + after)) | (random_of_bi == bj[:, None]).any(axis=1)
            if mask.causal:  # visible: j <= i and (whole or j < G or i < G)
                cell_any = ((c0 <= a1) & (whole | (c0 < n_global))) | (
                    (a0 < n_global) & (c0 <= np.minimum(a1, n_global - 1))
                )
                cell_all = (c1 <= a0) & (whole | (a1 < n_global) | (c1 < n_global))
            else:
                cell_any = whole | (c0 < n_global) | (a0 < n_global)
                cell_all = whole | (a1 < n_global) | (c1 < n_global)
            seen |= cell & cell_any
            full &= ~cell | cell_all
    return seen, full & seen


def _compress(
    head: Int[np.ndarray, " pairs"],
    row: Int[np.ndarray, " pairs"],
    col: Int[np.ndarray, " pairs"],
    full: Bool[np.ndarray, " pairs"],
    heads: int,
    n_rows: int,
) -> BlockTable:
    """The table with rows ``(head, row)`` listing ``col``: FULL entries first, each run ascending."""
    order = np.lexsort((col, ~full, row, head))
    flat_row = (head * n_rows + row)[order]
    counts = np.bincount(flat_row, minlength=heads * n_rows)
    n_full = np.bincount(flat_row[full[order]], minlength=heads * n_rows)
    end = np.cumsum(counts)
    start = end - counts
    bounds = np.stack([start, start + n_full, end], axis=-1).reshape(heads, n_rows, 3).astype(np.int32)
    blocks = col[order].astype(np.int32)
    bounds.setflags(write=False)
    blocks.setflags(write=False)
    return BlockTable(bounds, blocks)
