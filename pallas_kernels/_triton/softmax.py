"""Softmax attention (FlashAttention-2 scheme) as Pallas kernels for the Triton GPU lowering.

Layout: ``q`` is ``[batch, q_len, heads, head_dim]``, ``k``/``v`` are ``[batch, kv_len, kv_heads, head_dim]`` with
``heads = kv_heads * group``; query head ``h`` reads KV head ``h // group``. Query row ``r`` sits at absolute position
``i = r + kv_len - q_len``. Two masks share the kernels:

- windows (``softmax_attention``): ``i`` sees key ``j`` iff ``0 <= i - j < W_h`` (causal) or ``|i - j| < W_h``
  (non-causal), where ``W_h = windows[h]`` (``None`` = unlimited);
- block-sparse (``sparse_attention``): the BigBird rules of ``masks.SparseMask``.

Every kernel loops only over the blocks its mask can see, in two phases: blocks that are entirely visible run
without an element mask, the partial ones (diagonal, window edges, global rows/columns, ragged tails) apply it.
Windows give contiguous block ranges (``BlockRange``, computed in the kernel); sparse masks give rows of the static
block tables of ``block_tables.py`` (``_TableRow``). A sliding window therefore costs O(S * W) and a sparse mask
O(visible blocks) in the forward and in both backward kernels. Key rows of a sparse mask that are far longer than
the others (a causal global column is seen by every query block) are split across several dK/dV programs
(``block_tables.RowPieces``) whose partial sums are added afterwards, so no single program is the tail of the pass.

The log-sum-exp residual is kept in base 2 (``lse = log2(sum(exp2(s)))`` with ``s = scale * log2(e) * q.k``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from pallas_kernels._vma import out_struct
from pallas_kernels.block_ranges import (
    BlockRange,
    Geometry,
    Phase,
    int_div,
    kv_block_range,
    q_block_range,
    segment_block_ranges,
)
from pallas_kernels.block_tables import RowPieces, block_tables, split_long_rows
from pallas_kernels.masks import PAD_KEY, PAD_QUERY, Segments, SparseMask, WindowMask

from . import fast_math
from .compiler import compiler_params, pl, plgpu
from .element_masks import SparseRows, below, per_key, per_query

# Stands in for an unlimited window; large enough for any sequence, small enough that ``pos +- window`` fits int32.
_NO_WINDOW = 2**30
# Start of an unused random key block: no key position is in ``[_NO_KEY, _NO_KEY + block_size)``.
_NO_KEY = -(2**30)
# Triton's ``tl.dot`` needs every operand dimension to be at least 16.
_MIN_BLOCK = 16
_LOG2E = 1.4426950408889634


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch settings; every block must be a power of two and at least 16.

    ``block_q``/``block_k`` tile the forward kernel; ``block_q_bwd``/``block_k_bwd`` tile both backward kernels
    (the dQ kernel owns a query block and loops over key blocks, the dK/dV kernel the reverse).
    """

    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    num_warps: int
    num_stages: int
    num_warps_bwd: int
    num_stages_bwd: int

    def __post_init__(self):
        for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
            block = getattr(self, name)
            if block < _MIN_BLOCK or block & (block - 1):
                raise ValueError(f"{name}={block} must be a power of two >= {_MIN_BLOCK}")


# (largest head_dim, largest dtype itemsize) -> config; first matching row wins. 4-byte inputs get smaller tiles where
# the pipelined K/V stages would not fit in shared memory otherwise. Measured on an H200, causal, batch 2, 32/8 heads
# (BENCHMARKS.md, ``benchmarks/tune.py``): d128 bf16 at S=8192; d64 and d256 bf16 at S=8192 and d128 fp32 at S=4096
# (fourth session: forward -19% / -50% / -26%, fwd+bwd -5% / -40% / - against the rows they replaced). The d256
# fp32 row is not measured (it is the smallest that fits).
_CONFIG_TABLE: tuple[tuple[int, int, KernelConfig], ...] = (
    (64, 2, KernelConfig(64, 64, 64, 64, num_warps=4, num_stages=3, num_warps_bwd=4, num_stages_bwd=3)),
    (128, 2, KernelConfig(128, 64, 64, 64, num_warps=8, num_stages=3, num_warps_bwd=4, num_stages_bwd=2)),
    (256, 2, KernelConfig(128, 64, 32, 32, num_warps=8, num_stages=2, num_warps_bwd=4, num_stages_bwd=2)),
    (64, 4, KernelConfig(128, 64, 64, 64, num_warps=4, num_stages=2, num_warps_bwd=4, num_stages_bwd=2)),
    (128, 4, KernelConfig(32, 64, 32, 32, num_warps=4, num_stages=2, num_warps_bwd=4, num_stages_bwd=2)),
    (256, 4, KernelConfig(32, 32, 32, 32, num_warps=8, num_stages=2, num_warps_bwd=8, num_stages_bwd=1)),
)


# (head_dim, itemsize) -> forward block_k where no head has a window: long unmasked rows amortise bigger key tiles.
# Measured on an H200 at S=8192, d128 bf16: 128x128 forward +4% causal, but -13% with W=1024 (BENCHMARKS.md).
_UNLIMITED_FWD_BLOCK_K = {(128, 2): 128}


def default_config(q_len: int, kv_len: int, head_dim: int, dtype: Any, unlimited: bool = False) -> KernelConfig:
    """Heuristic config for one shape: a row of ``_CONFIG_TABLE``, blocks shrunk to fit short sequences.

    ``unlimited``: no head has a window (plain causal or full attention).
    """
    itemsize = jnp.dtype(dtype).itemsize
    head_dim_padded = _pow2_at_least(head_dim)
    config = next(
        (c for max_d, max_size, c in _CONFIG_TABLE if head_dim_padded <= max_d and itemsize <= max_size),
        _CONFIG_TABLE[-1][2],
    )
    if unlimited and (head_dim_padded, itemsize) in _UNLIMITED_FWD_BLOCK_K:
        config = dataclasses.replace(config, block_k=_UNLIMITED_FWD_BLOCK_K[head_dim_padded, itemsize])
    q_cap, kv_cap = _pow2_at_least(q_len), _pow2_at_least(kv_len)
    return dataclasses.replace(
        config,
        block_q=min(config.block_q, q_cap),
        block_k=min(config.block_k, kv_cap),
        block_q_bwd=min(config.block_q_bwd, q_cap),
        block_k_bwd=min(config.block_k_bwd, kv_cap),
    )


def sparse_config(q_len: int, kv_len: int, head_dim: int, dtype: Any, mask: SparseMask) -> KernelConfig:
    """``default_config`` with tiles no larger than ``mask.block_size`` where that is a power of two >= 16, so tiles
    do not straddle mask blocks."""
    config = default_config(q_len, kv_len, head_dim, dtype)
    bs = mask.block_size
    if bs < _MIN_BLOCK or bs & (bs - 1):
        return config
    # Measured on an H200 at S=16384, block 64, d128 bf16 (BENCHMARKS.md): 64x64 forward tiles run 1.5x faster with
    # 4 warps than 8; 64x64 backward tiles 11% faster than 64x32 once long key rows are split.
    block_q = min(config.block_q, bs)
    return dataclasses.replace(
        config,
        block_q=block_q,
        block_k=min(config.block_k, bs),
        block_q_bwd=min(config.block_q_bwd, bs),
        block_k_bwd=min(config.block_k_bwd, bs),
        num_warps=min(config.num_warps, 4) if block_q <= 64 else config.num_warps,
    )


def config_for(q: Array, k: Array, mask: WindowMask | SparseMask) -> KernelConfig:
    """The default config of one call."""
    q_len, kv_len, head_dim = q.shape[1], k.shape[1], q.shape[3]
    if isinstance(mask, SparseMask):
        return sparse_config(q_len, kv_len, head_dim, q.dtype, mask)
    return default_config(q_len, kv_len, head_dim, q.dtype, unlimited=all(w is None for w in mask.windows))


def forward(
    q: Float[Array, "batch q_len heads head_dim"],
    k: Float[Array, "batch kv_len kv_heads head_dim"],
    v: Float[Array, "batch kv_len kv_heads head_dim"],
    mask: WindowMask | SparseMask,
    softmax_scale: float,
    interpret: bool,
    config: KernelConfig,
    logits_soft_cap: float | None = None,
    segments: Segments | None = None,
    sinks: Float[Array, "batch heads"] | None = None,
) -> tuple[Float[Array, "batch q_len heads head_dim"], Float[Array, "batch heads q_len"]]:
    """Output (``q.dtype``) and base-2 log-sum-exp ``[batch, heads, q_len]`` (``+inf`` on rows that see no key and no
    sink). ``logits_soft_cap``: scores ``cap * tanh(s / cap)``; ``segments``: packed/padded rows
    (``masks.Segments``); ``sinks``: one logit per row and query head, counted in each row's normaliser."""
    return _forward(q, k, v, _kernel_mask(mask), softmax_scale, interpret, config, logits_soft_cap, segments, sinks)


def backward(
    mask: WindowMask | SparseMask,
    softmax_scale: float,
    interpret: bool,
    config: KernelConfig,
    res: tuple[Array, Array, Array, Array, Array],
    do: Float[Array, "batch q_len heads head_dim"],
    logits_soft_cap: float | None = None,
    segments: Segments | None = None,
) -> tuple[Array, Array, Array]:
    """dQ, dK, dV from the residuals ``(q, k, v, out, lse)`` of either backend's forward (sinks live in ``lse``)."""
    return _backward(_kernel_mask(mask), softmax_scale, interpret, config, logits_soft_cap, res, do, segments)


def _kernel_mask(mask: WindowMask | SparseMask) -> _Mask:
    return _Sparse(mask) if isinstance(mask, SparseMask) else _Windows(tuple(mask.windows), bool(mask.causal))


# --------------------------------------------------------------------------------------------------------------
# Shared pieces: static shape info, window element mask, block ranges and table rows, the two-phase loop,
# tile loads/stores.


class _Static(Geometry):
    """``Geometry`` with the head size the Triton tiles use (a power of two >= 16) and the score map."""

    @property
    def head_dim_padded(self) -> int:
        return _pow2_at_least(self.head_dim)

    @property
    def score_scale(self) -> float:
        """Factor from ``scores`` to base-2 logits: without a soft-cap the scores are the raw products (the scale
        folds into exp2's multiply-add), with one they are base-2 logits already."""
        return self.qk_scale if self.logits_soft_cap is None else 1.0

    def scores(self, s: Float[Array, "m n"]) -> tuple[Float[Array, "m n"], Float[Array, "m n"] | None]:
        """Raw products ``q.k`` -> scores (see ``score_scale``), and with a soft-cap ``t = tanh(scale * s / cap)``,
        whose derivative ``1 - t^2`` the backward applies."""
        if self.logits_soft_cap is None:
            return s, None
        t = fast_math.tanh(s * (self.softmax_scale / self.logits_soft_cap), self.fast_tanh)
        return t * (self.logits_soft_cap * _LOG2E), t


class _TableRow(NamedTuple):
    """Entries ``[start, full_end)`` of ``blocks_ref`` are entirely visible blocks, ``[full_end, end)`` partial ones."""

    blocks_ref: Any
    start: Int[Array, ""]
    full_end: Int[Array, ""]
    end: Int[Array, ""]

    def phases(self) -> tuple[Phase, Phase]:
        block = lambda t: self.blocks_ref[t]
        return Phase(self.start, self.full_end, block), Phase(self.full_end, self.end, block)

    def all_masked(self) -> _TableRow:
        """The row with every block in the masked phase (the table's full blocks are full only without segments)."""
        return self._replace(full_end=self.start)

    def piece(self, part: Int[Array, ""], length: int) -> _TableRow:
        """Entries ``[start + part * length, start + (part + 1) * length)`` of the row (``RowPieces``)."""
        lo = self.start + part * length
        hi = jnp.minimum(lo + length, self.end)
        clip = lambda x: jnp.minimum(jnp.maximum(x, lo), hi)
        return _TableRow(self.blocks_ref, clip(self.start), clip(self.full_end), clip(self.end))


def _pow2_at_least(n: int) -> int:
    return max(_MIN_BLOCK, pl.next_power_of_2(n))


def _visible(
    q_pos: Int[Array, "..."], k_pos: Int[Array, "..."], window: Int[Array, ""], causal: bool, kv_len: int | None
) -> Bool[Array, "..."]:
    """Whether the key at ``k_pos`` is visible to the query at ``q_pos`` (broadcasting); keys past ``kv_len`` never are
    (``None``: no key is past it)."""
    d = q_pos - k_pos
    # One unsigned comparison per bound pair: 0 <= d < W (causal) or -W < d < W. Positions and windows are below
    # 2**30, so nothing wraps; this halves the element-mask work of the partial blocks.
    if causal:
        seen = below(d, window)
    else:
        seen = below(d + (window - 1), 2 * window - 1)
    return seen if kv_len is None else seen & (k_pos < kv_len)


def _two_phase_loop(blocks: BlockRange | _TableRow, step: Callable[..., Any], carry: Any) -> Any:
    """Runs ``step(block, carry, masked=...)`` over ``blocks``: unmasked over the full ones, masked over the rest."""
    full, partial = blocks.phases()
    carry = lax.fori_loop(full.start, full.stop, lambda t, c: step(full.block(t), c, masked=False), carry)
    return lax.fori_loop(partial.start, partial.stop, lambda t, c: step(partial.block(t), c, masked=True), carry)


def _row_mask(start, size: int, length: int) -> Bool[Array, " size"] | None:
    """In-bounds rows of the tile ``[start, start + size)``; ``None`` when tiles never cross ``length``."""
    if length % size == 0:
        return None
    return start + jnp.arange(size, dtype=jnp.int32) < length


def _tile_mask(row_ok: Bool[Array, " rows"] | None, st: _Static) -> Bool[Array, "rows head_dim_padded"] | None:
    mask = None if row_ok is None else row_ok[:, None]
    if st.head_dim < st.head_dim_padded:
        head_ok = (jnp.arange(st.head_dim_padded, dtype=jnp.int32) < st.head_dim)[None, :]
        mask = head_ok if mask is None else mask & head_ok
    return mask


def _load_tile(ref, row_ok, st: _Static) -> Array:
    """Loads a ``[rows, head_dim_padded]`` tile; masked rows and padded head columns read 0."""
    mask = _tile_mask(row_ok, st)
    if mask is None:
        return plgpu.load(ref)
    return plgpu.load(ref, mask=mask, other=0.0)


def _store_tile(ref, value: Array, row_ok, st: _Static) -> None:
    plgpu.store(ref, value.astype(ref.dtype), mask=_tile_mask(row_ok, st))


def _load_rows(ref, row_ok, other: float) -> Array:
    """Loads a per-row fp32 vector (lse, delta); masked rows read ``other``."""
    if row_ok is None:
        return plgpu.load(ref)
    return plgpu.load(ref, mask=row_ok, other=other)


def _whole_specs(arrays: dict[str, Array]) -> dict[str, pl.BlockSpec]:
    """Each array as a single block of a 3-D grid, its block shape rounded up to powers of two."""

    def spec(x: Array) -> pl.BlockSpec:
        return pl.BlockSpec(tuple(pl.next_power_of_2(n) for n in x.shape), lambda i, b, h: (0,) * x.ndim)

    return {name: spec(x) for name, x in arrays.items()}


# --------------------------------------------------------------------------------------------------------------
# Masks. A static mask (``_Windows`` or ``_Sparse``, a jit static argument) names the arrays its kernels read
# (``inputs``, passed whole, by name) and, inside a kernel, gives per query head (``head``) the blocks a program loops
# over and the element mask of a query tile's partial blocks. ``by_key`` selects the dK/dV orientation: the program
# owns a key block and loops over query blocks; ``key_pieces`` says which of those loops are long enough to split.


@dataclasses.dataclass(frozen=True)
class _Windows:
    """Per-head windows (``None`` = unlimited), causal or not."""

    windows: tuple[int | None, ...]
    causal: bool

    def inputs(self, st: _Static, block_q: int, block_k: int, by_key: bool) -> dict[str, Array]:
        return {"windows": _window_array(self.windows)}

    def key_pieces(self, st: _Static, block_q: int, block_k: int) -> RowPieces | None:
        """Window bands give every key block about the same number of query blocks: no piece to split off."""
        return None

    def head(self, refs: dict[str, Any], h: Int[Array, ""], st: _Static) -> _WindowHead:
        return _WindowHead(refs["windows"][h], st)


class _WindowHead(NamedTuple):
    """The window of one query head, inside a kernel."""

    window: Int[Array, ""]
    st: _Static

    def blocks(self, tile, block_q: int, block_k: int, *, by_key: bool) -> BlockRange:
        """Query blocks that see key block ``tile`` if ``by_key``, else key blocks seen by query block ``tile``."""
        st = self.st
        if by_key:
            j0 = tile * block_k
            return q_block_range(j0, jnp.minimum(j0 + block_k, st.kv_len) - 1, self.window, st, block_q)
        r0 = tile * block_q
        r_last = jnp.minimum(r0 + block_q, st.q_len) - 1
        return kv_block_range(r0 + st.offset, r_last + st.offset, self.window, st, block_k)

    def rows(self, r0, block_q: int) -> _WindowRows:
        """The element mask of query rows ``[r0, r0 + block_q)``."""
        return _WindowRows(r0 + self.st.offset + jnp.arange(block_q, dtype=jnp.int32), self.window, self.st)


class _WindowRows(NamedTuple):
    q_pos: Int[Array, " block_q"]
    window: Int[Array, ""]
    st: _Static

    def visible(self, k_pos: Int[Array, " block_k"], keys_first: bool) -> Bool[Array, "..."]:
        """``[block_q, block_k]``, or ``[block_k, block_q]`` if ``keys_first``."""
        kv_len = self.st.kv_len if self.st.kv_len % k_pos.shape[0] else None  # no tile crosses the end otherwise
        q_pos, k_pos = per_query(self.q_pos, keys_first), per_key(k_pos, keys_first)
        return _visible(q_pos, k_pos, self.window, self.st.causal, kv_len)


def _window_array(windows: tuple[int | None, ...]) -> Int[Array, " heads_padded"]:
    """Per-head windows as int32, padded to a power-of-two length (block shapes must be powers of two)."""
    values = [_NO_WINDOW if w is None else min(w, _NO_WINDOW) for w in windows]
    values += [_NO_WINDOW] * (pl.next_power_of_2(len(values)) - len(values))
    return jnp.asarray(values, jnp.int32)


@dataclasses.dataclass(frozen=True)
class _Sparse:
    """A ``SparseMask``: its block tables drive the loops, its rules the element mask."""

    sparse: SparseMask

    @property
    def causal(self) -> bool:
        return self.sparse.causal

    def inputs(self, st: _Static, block_q: int, block_k: int, by_key: bool) -> dict[str, Array]:
        """The table's ``bounds`` and ``blocks`` (rows are key blocks if ``by_key``), ``_random_key_starts`` if the
        mask has random blocks, and for ``by_key`` the extra pieces of ``key_pieces`` if there are any."""
        tables = block_tables(self.sparse, st.q_len, st.kv_len, block_q, block_k)
        table = tables.by_key if by_key else tables.by_query
        arrays = {"bounds": jnp.asarray(table.bounds), "blocks": jnp.asarray(table.blocks)}
        if self.sparse.num_random_blocks:
            arrays["random"] = _random_key_starts(self.sparse, st, block_q)
        pieces = self.key_pieces(st, block_q, block_k) if by_key else None
        if pieces is not None:
            arrays["piece_tiles"], arrays["piece_parts"] = jnp.asarray(pieces.tiles), jnp.asarray(pieces.parts)
        return arrays

    def key_pieces(self, st: _Static, block_q: int, block_k: int) -> RowPieces | None:
        """``split_long_rows`` of the key-major table (global columns), or ``None`` when no row is long."""
        pieces = split_long_rows(block_tables(self.sparse, st.q_len, st.kv_len, block_q, block_k).by_key)
        return pieces if pieces.tiles.size else None

    def head(self, refs: dict[str, Any], h: Int[Array, ""], st: _Static) -> _SparseHead:
        return _SparseHead(self.sparse, refs, h, st)


def _random_key_starts(sparse: SparseMask, st: _Static, block_q: int) -> Int[Array, "heads_x_slots rows"]:
    """First key position of each random block of each query row; row ``h * r + slot`` holds slot ``slot`` of head
    ``h``, unused slots ``_NO_KEY``.

    Query rows are padded to whole query blocks (the padding repeats the last row). Expanded from the small
    ``[heads, blocks, r]`` table on the device, so that only the small table is a constant.
    """
    bs = sparse.block_size
    table = sparse.random_blocks(pl.cdiv(st.kv_len, bs))
    starts = np.where(table >= 0, table * bs, _NO_KEY).transpose(0, 2, 1).reshape(-1, table.shape[1])
    q_pos = jnp.minimum(jnp.arange(pl.cdiv(st.q_len, block_q) * block_q) + st.offset, st.kv_len - 1)
    return jnp.take(jnp.asarray(starts, jnp.int32), q_pos // bs, axis=1)


class _SparseHead(NamedTuple):
    """The sparse mask of one query head, inside a kernel; ``refs`` are the arrays of ``_Sparse.inputs``."""

    sparse: SparseMask
    refs: dict[str, Any]
    h: Int[Array, ""]
    st: _Static

    def blocks(self, tile, block_q: int, block_k: int, *, by_key: bool) -> _TableRow:
        """Row ``tile`` of the table (``_Sparse.inputs`` passed the one of this orientation)."""
        bounds, h = self.refs["bounds"], self.h
        return _TableRow(self.refs["blocks"], bounds[h, tile, 0], bounds[h, tile, 1], bounds[h, tile, 2])

    def rows(self, r0, block_q: int) -> SparseRows:
        """The element mask of query rows ``[r0, r0 + block_q)``."""
        r = self.sparse.num_random_blocks
        q_pos = r0 + self.st.offset + jnp.arange(block_q, dtype=jnp.int32)
        rows = pl.ds(r0, block_q)
        random = tuple(plgpu.load(self.refs["random"].at[self.h * r + slot, rows]) for slot in range(r))
        return SparseRows.at(q_pos, random, self.sparse, self.st.kv_len)


_Mask = _Windows | _Sparse


# --------------------------------------------------------------------------------------------------------------
# Options: segment ids (packing, padding) and sinks. Their arrays (``_option_inputs``) select the program's batch
# row; a kernel sees an empty dict without them, so their absence costs nothing.


def _option_inputs(
    st: _Static, segments: Segments | None, sinks: Array | None, block_q: int, block_k: int, *, by_key: bool
) -> tuple[dict[str, Array], dict[str, pl.BlockSpec]]:
    """Arrays and block specs: ``q_segments``/``kv_segments`` (ids padded with ``PAD_QUERY``/``PAD_KEY`` to powers
    of two), ``segment_ranges`` (``segment_block_ranges`` of each program tile) and ``sinks`` (base-2)."""
    arrays, specs = {}, {}

    def add(name: str, x: Array, fill) -> None:
        shape = tuple(pl.next_power_of_2(n) for n in x.shape[1:])
        arrays[name] = jnp.pad(x, [(0, 0)] + [(0, n - m) for n, m in zip(shape, x.shape[1:])], constant_values=fill)
        specs[name] = pl.BlockSpec((None, *shape), lambda i, b, h: (b,) + (0,) * len(shape))

    if segments is not None:
        add("q_segments", segments.q, PAD_QUERY)
        add("kv_segments", segments.kv, PAD_KEY)
        add("segment_ranges", segment_block_ranges(segments.q, segments.kv, block_q, block_k, by_key=by_key), 0)
    if sinks is not None:
        add("sinks", sinks.astype(jnp.float32) * _LOG2E, 0.0)
    return arrays, specs


class _SegmentIds(NamedTuple):
    """The segment ids of a program's batch row, inside a kernel (the ``_option_inputs`` refs)."""

    refs: dict[str, Any]

    def queries(self, r0, size: int) -> Int[Array, " size"]:
        return plgpu.load(self.refs["q_segments"].at[pl.ds(r0, size)])

    def keys(self, j0, size: int) -> Int[Array, " size"]:
        return plgpu.load(self.refs["kv_segments"].at[pl.ds(j0, size)])

    def restrict(self, blocks: BlockRange | _TableRow, tile) -> BlockRange | _TableRow:
        """``blocks`` of program tile ``tile`` cut to the segments' range (a sparse table row: all masked)."""
        if isinstance(blocks, _TableRow):
            return blocks.all_masked()
        ranges = self.refs["segment_ranges"]
        return blocks.intersect(BlockRange(*(ranges[tile, c] for c in range(4))))


def _segment_ids(option_refs: dict[str, Any]) -> _SegmentIds | None:
    return _SegmentIds(option_refs) if "q_segments" in option_refs else None


def _same_segment(q_seg, k_seg, keys_first: bool) -> Bool[Array, "..."]:
    return per_query(q_seg, keys_first) == per_key(k_seg, keys_first)


# --------------------------------------------------------------------------------------------------------------
# Forward.


def _kv_block_scores(
    kb, *, masked: bool, q, q_rows, q_seg, segs: _SegmentIds | None, k_ref, v_ref, st: _Static, block_k: int
) -> tuple[Array, Array, Array, Array | None]:
    """Key block ``kb``'s K and V tiles, the scores ``[block_q, block_k]`` of the query tile ``q`` against it
    (``_Static.scores``) and the soft-cap's tanh; ``masked`` (partial blocks) sets invisible scores, under
    ``q_rows``' element mask and the segments (``q_seg``: the tile's ids), to ``-inf``.

    Callers scale inside ``exp2(s * score_scale - m)``, one fused multiply-add per score."""
    k_pos = kb * block_k + jnp.arange(block_k, dtype=jnp.int32)
    k_ok = _row_mask(kb * block_k, block_k, st.kv_len) if masked else None
    rows = pl.ds(kb * block_k, block_k)
    k = _load_tile(k_ref.at[rows, :], k_ok, st)
    v = _load_tile(v_ref.at[rows, :], k_ok, st)
    s, t = st.scores(plgpu.dot(q, k, trans_b=True))
    if masked:
        seen = q_rows.visible(k_pos, keys_first=False)
        if segs is not None:
            seen &= _same_segment(q_seg, segs.keys(kb * block_k, block_k), keys_first=False)
        s = jnp.where(seen, s, -jnp.inf)
    return k, v, s, t


def _fwd_kv_block(kb, carry, *, masked: bool, **tiles) -> tuple[Array, Array, Array]:
    """One online-softmax step over key block ``kb`` (``tiles``: the arguments of ``_kv_block_scores``)."""
    acc, m, l = carry
    _, v, s, _ = _kv_block_scores(kb, masked=masked, **tiles)
    qk_scale = tiles["st"].score_scale
    m_new = jnp.maximum(m, jnp.max(s, axis=1) * qk_scale)
    # A row with nothing visible so far keeps m = -inf; subtract 0 instead so exp2 gives 0 rather than NaN.
    m_sub = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
    alpha = jnp.exp2(m - m_sub)
    p = jnp.exp2(s * qk_scale - m_sub[:, None])
    l = l * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v)
    return acc, m_new, l


def _fwd_kernel(
    mask_refs, option_refs, q_ref, k_ref, v_ref, o_ref, lse_ref, *, mask: _Mask, st: _Static, block_q: int,
    block_k: int
):
    """Grid ``(q_blocks, batch, heads)``: one query block of one head against its visible key blocks."""
    qb, h = pl.program_id(0), pl.program_id(2)
    head = mask.head(mask_refs, h, st)
    segs = _segment_ids(option_refs)
    r0 = qb * block_q
    row_ok = _row_mask(r0, block_q, st.q_len)
    q = _load_tile(q_ref, row_ok, st)

    acc0 = jnp.zeros((block_q, st.head_dim_padded), jnp.float32)
    # A sink is a key of logit ``sink`` and value 0 seen by every row: the running max and sum start from it.
    if "sinks" in option_refs:
        m0 = jnp.full((block_q,), option_refs["sinks"][h], jnp.float32)
        l0 = jnp.ones((block_q,), jnp.float32)
    else:
        m0, l0 = jnp.full((block_q,), -jnp.inf, jnp.float32), jnp.zeros((block_q,), jnp.float32)
    carry = (acc0, m0, l0)
    step = functools.partial(
        _fwd_kv_block, q=q, q_rows=head.rows(r0, block_q), q_seg=None if segs is None else segs.queries(r0, block_q),
        segs=segs, k_ref=k_ref, v_ref=v_ref, st=st, block_k=block_k,
    )
    blocks = head.blocks(qb, block_q, block_k, by_key=False)
    acc, m, l = _two_phase_loop(blocks if segs is None else segs.restrict(blocks, qb), step, carry)

    empty = l == 0.0
    _store_tile(o_ref, acc / jnp.where(empty, 1.0, l)[:, None], row_ok, st)
    # +inf makes the backward's exp2(s - lse) vanish on rows that saw no key.
    plgpu.store(lse_ref, jnp.where(empty, jnp.inf, m + jnp.log2(l)), mask=row_ok)


def _static(q: Array, k: Array, causal: bool, softmax_scale: float, logits_soft_cap: float | None,
            interpret: bool) -> _Static:
    return _Static(q.shape[1], k.shape[1], q.shape[3], causal, softmax_scale, logits_soft_cap,
                   fast_math.approximate_tanh_for(q.dtype, interpret))


def _kv_head(h, group: int):
    return h if group == 1 else int_div(h, group)


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6, 7))
def _forward(
    q: Float[Array, "batch q_len heads head_dim"],
    k: Float[Array, "batch kv_len kv_heads head_dim"],
    v: Float[Array, "batch kv_len kv_heads head_dim"],
    mask: _Mask,
    softmax_scale: float,
    interpret: bool,
    config: KernelConfig,
    logits_soft_cap: float | None,
    segments: Segments | None,
    sinks: Array | None,
) -> tuple[Float[Array, "batch q_len heads head_dim"], Float[Array, "batch heads q_len"]]:
    """Output and base-2 log-sum-exp ``[batch, heads, q_len]``."""
    batch, q_len, heads, _ = q.shape
    kv_len, group = k.shape[1], heads // k.shape[2]
    st = _static(q, k, mask.causal, softmax_scale, logits_soft_cap, interpret)
    bq, dp = config.block_q, st.head_dim_padded
    mask_inputs = mask.inputs(st, bq, config.block_k, by_key=False)
    option_inputs, option_specs = _option_inputs(st, segments, sinks, bq, config.block_k, by_key=False)

    q_spec = pl.BlockSpec((None, bq, None, dp), lambda i, b, h: (b, i, h, 0))
    kv_spec = pl.BlockSpec((None, pl.next_power_of_2(kv_len), None, dp), lambda i, b, h: (b, 0, _kv_head(h, group), 0))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, mask=mask, st=st, block_q=bq, block_k=config.block_k),
        grid=(pl.cdiv(q_len, bq), batch, heads),
        in_specs=[_whole_specs(mask_inputs), option_specs, q_spec, kv_spec, kv_spec],
        out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))],
        out_shape=[out_struct(q.shape, q.dtype, q), out_struct((batch, heads, q_len), jnp.float32, q)],
        compiler_params=compiler_params(config.num_warps, config.num_stages),
        interpret=interpret,
        name="softmax_attention_fwd",
    )(mask_inputs, option_inputs, q, k, v)


# --------------------------------------------------------------------------------------------------------------
# Backward: delta = rowsum(dO * O), then dQ (grid over query blocks) and dK/dV (grid over key blocks).


def _delta_kernel(o_ref, do_ref, delta_ref, *, st: _Static, block_q: int):
    row_ok = _row_mask(pl.program_id(0) * block_q, block_q, st.q_len)
    o = _load_tile(o_ref, row_ok, st).astype(jnp.float32)
    do = _load_tile(do_ref, row_ok, st).astype(jnp.float32)
    plgpu.store(delta_ref, jnp.sum(o * do, axis=1), mask=row_ok)


def _dq_kv_block(kb, dq, *, masked: bool, do, lse, delta, **tiles) -> Array:
    """Adds key block ``kb``'s contribution ``dS @ K`` (without the softmax scale) to ``dq``."""
    k, v, s, t = _kv_block_scores(kb, masked=masked, **tiles)
    p = jnp.exp2(s * tiles["st"].score_scale - lse[:, None])
    ds = p * (plgpu.dot(do, v, trans_b=True) - delta[:, None])
    if t is not None:  # through the soft-cap
        ds = ds * (1.0 - t * t)
    return dq + plgpu.dot(ds.astype(k.dtype), k)


def _dq_kernel(
    mask_refs,
    option_refs,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dq_ref,
    *,
    mask: _Mask,
    st: _Static,
    block_q: int,
    block_k: int,
):
    """Grid ``(q_blocks, batch, heads)``: dQ of one query block, looping over its visible key blocks."""
    qb, h = pl.program_id(0), pl.program_id(2)
    head = mask.head(mask_refs, h, st)
    segs = _segment_ids(option_refs)
    r0 = qb * block_q
    row_ok = _row_mask(r0, block_q, st.q_len)
    q = _load_tile(q_ref, row_ok, st)
    do = _load_tile(do_ref, row_ok, st)
    lse = _load_rows(lse_ref, row_ok, jnp.inf)
    delta = _load_rows(delta_ref, row_ok, 0.0)
    blocks = head.blocks(qb, block_q, block_k, by_key=False)
    if segs is not None:
        blocks = segs.restrict(blocks, qb)

    step = functools.partial(
        _dq_kv_block,
        q=q,
        do=do,
        lse=lse,
        delta=delta,
        q_rows=head.rows(r0, block_q),
        q_seg=None if segs is None else segs.queries(r0, block_q),
        segs=segs,
        k_ref=k_ref,
        v_ref=v_ref,
        st=st,
        block_k=block_k,
    )
    dq = _two_phase_loop(blocks, step, jnp.zeros((block_q, st.head_dim_padded), jnp.float32))
    _store_tile(dq_ref, dq * st.softmax_scale, row_ok, st)


def _dkdv_q_block(
    qb, carry, *, masked: bool, h, head, k, v, k_pos, k_seg, segs: _SegmentIds | None, q_ref, do_ref, lse_ref,
    delta_ref, st: _Static, block_q: int
) -> tuple[Array, Array]:
    """Adds query block ``qb`` of head ``h`` to ``(dk, dv)``; scores are kept transposed, ``[keys, queries]``."""
    dk, dv = carry
    r0 = qb * block_q
    row_ok = _row_mask(r0, block_q, st.q_len) if masked else None
    rows = pl.ds(r0, block_q)
    q = _load_tile(q_ref.at[rows, h, :], row_ok, st)
    do = _load_tile(do_ref.at[rows, h, :], row_ok, st)
    lse = _load_rows(lse_ref.at[h, rows], row_ok, jnp.inf)
    delta = _load_rows(delta_ref.at[h, rows], row_ok, 0.0)
    s_t, t_t = st.scores(plgpu.dot(k, q, trans_b=True))
    if masked:
        seen = head.rows(r0, block_q).visible(k_pos, keys_first=True)
        if segs is not None:
            seen &= _same_segment(segs.queries(r0, block_q), k_seg, keys_first=True)
        s_t = jnp.where(seen, s_t, -jnp.inf)
    p_t = jnp.exp2(s_t * st.score_scale - lse[None, :])
    dv = dv + plgpu.dot(p_t.astype(do.dtype), do)
    ds_t = p_t * (plgpu.dot(v, do, trans_b=True) - delta[None, :])
    if t_t is not None:  # through the soft-cap
        ds_t = ds_t * (1.0 - t_t * t_t)
    dk = dk + plgpu.dot(ds_t.astype(q.dtype), q)
    return dk, dv


def _dkdv_kernel(
    mask_refs,
    option_refs,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dk_ref,
    dv_ref,
    *piece_refs,
    mask: _Mask,
    st: _Static,
    group: int,
    block_q: int,
    block_k: int,
    pieces: RowPieces | None,
):
    """Grid ``(extra_pieces + kv_blocks, batch, kv_heads)``: dK/dV of one key block summed over the ``group`` query
    heads, or of one piece of its loop over query blocks (``RowPieces``).

    Program ``n_extra + kb`` runs piece 0 of key block ``kb`` and writes ``dk_ref``/``dv_ref``; programs
    ``[0, n_extra)`` run the extra pieces, first since they are the longest, and write their partial sums to
    ``piece_refs`` (``[n_extra * block_k]`` rows each). ``k_ref``/``v_ref``/``q_ref``/``do_ref`` hold all positions
    (``q_ref``/``do_ref`` all heads, ``[q_len, heads, d]``) and ``lse_ref``/``delta_ref`` are ``[heads, q_len]``.
    """
    g = pl.program_id(2)
    if pieces is None:
        kb, part, is_extra = pl.program_id(0), None, None
    else:
        n_extra = pieces.tiles.size
        is_extra = pl.program_id(0) < n_extra
        n = jnp.minimum(pl.program_id(0), n_extra - 1)
        kb = jnp.where(is_extra, mask_refs["piece_tiles"][n], pl.program_id(0) - n_extra)
        part = jnp.where(is_extra, mask_refs["piece_parts"][n], 0)
    j0 = kb * block_k
    k_ok = _row_mask(j0, block_k, st.kv_len)
    keys = pl.ds(j0, block_k)
    k = _load_tile(k_ref.at[keys, :], k_ok, st)
    v = _load_tile(v_ref.at[keys, :], k_ok, st)
    k_pos = j0 + jnp.arange(block_k, dtype=jnp.int32)
    segs = _segment_ids(option_refs)
    k_seg = None if segs is None else segs.keys(j0, block_k)

    def head_step(t, carry):
        h = g * group + t
        head = mask.head(mask_refs, h, st)
        step = functools.partial(
            _dkdv_q_block,
            h=h,
            head=head,
            k=k,
            v=v,
            k_pos=k_pos,
            k_seg=k_seg,
            segs=segs,
            q_ref=q_ref,
            do_ref=do_ref,
            lse_ref=lse_ref,
            delta_ref=delta_ref,
            st=st,
            block_q=block_q,
        )
        blocks = head.blocks(kb, block_q, block_k, by_key=True)
        if segs is not None:
            blocks = segs.restrict(blocks, kb)
        return _two_phase_loop(blocks if part is None else blocks.piece(part, pieces.length), step, carry)

    zeros = jnp.zeros((block_k, st.head_dim_padded), jnp.float32)
    dk, dv = lax.fori_loop(0, group, head_step, (zeros, zeros))
    dk = dk * st.softmax_scale
    if pieces is None:
        _store_tile(dk_ref, dk, k_ok, st)
        _store_tile(dv_ref, dv, k_ok, st)
        return
    # Each program writes exactly one of the two outputs; the other's block (a clamped index) is left untouched.
    for refs, write in (((dk_ref, dv_ref), ~is_extra), (piece_refs, is_extra)):
        ok = jnp.broadcast_to(write, (block_k,)) if k_ok is None else k_ok & write
        _store_tile(refs[0], dk, ok, st)
        _store_tile(refs[1], dv, ok, st)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _backward(
    mask: _Mask,
    softmax_scale: float,
    interpret: bool,
    config: KernelConfig,
    logits_soft_cap: float | None,
    res: tuple[Array, Array, Array, Array, Array],
    do: Float[Array, "batch q_len heads head_dim"],
    segments: Segments | None,
) -> tuple[Array, Array, Array]:
    q, k, v, out, lse = res
    batch, q_len, heads, _ = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    st = _static(q, k, mask.causal, softmax_scale, logits_soft_cap, interpret)
    bq, bk, dp = config.block_q_bwd, config.block_k_bwd, st.head_dim_padded
    params = compiler_params(config.num_warps_bwd, config.num_stages_bwd)
    q_spec = pl.BlockSpec((None, bq, None, dp), lambda i, b, h: (b, i, h, 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    q_grid = (pl.cdiv(q_len, bq), batch, heads)

    delta = pl.pallas_call(
        functools.partial(_delta_kernel, st=st, block_q=bq),
        grid=q_grid,
        in_specs=[q_spec, q_spec],
        out_specs=row_spec,
        out_shape=out_struct(lse.shape, jnp.float32, q),
        compiler_params=params,
        interpret=interpret,
        name="softmax_attention_bwd_delta",
    )(out, do)

    kv_all_spec = pl.BlockSpec(
        (None, pl.next_power_of_2(kv_len), None, dp), lambda i, b, h: (b, 0, _kv_head(h, group), 0)
    )
    dq_mask_inputs = mask.inputs(st, bq, bk, by_key=False)
    dq_options, dq_option_specs = _option_inputs(st, segments, None, bq, bk, by_key=False)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, mask=mask, st=st, block_q=bq, block_k=bk),
        grid=q_grid,
        in_specs=[
            _whole_specs(dq_mask_inputs), dq_option_specs, q_spec, kv_all_spec, kv_all_spec, q_spec, row_spec, row_spec
        ],
        out_specs=q_spec,
        out_shape=out_struct(q.shape, q.dtype, q),
        compiler_params=params,
        interpret=interpret,
        name="softmax_attention_bwd_dq",
    )(dq_mask_inputs, dq_options, q, k, v, do, lse, delta)

    q_len_p2, heads_p2 = pl.next_power_of_2(q_len), pl.next_power_of_2(heads)
    q_all_spec = pl.BlockSpec((None, q_len_p2, heads_p2, dp), lambda j, b, g: (b, 0, 0, 0))
    row_all_spec = pl.BlockSpec((None, heads_p2, q_len_p2), lambda j, b, g: (b, 0, 0))
    kv_all_spec = pl.BlockSpec((None, pl.next_power_of_2(kv_len), None, dp), lambda j, b, g: (b, 0, g, 0))
    pieces = mask.key_pieces(st, bq, bk)
    n_extra = 0 if pieces is None else pieces.tiles.size
    out_specs = [pl.BlockSpec((None, bk, None, dp), lambda j, b, g: (b, jnp.maximum(j - n_extra, 0), g, 0))] * 2
    # With pieces, key blocks sum partials: the outputs stay fp32 until the sum.
    out_dtype = k.dtype if pieces is None else jnp.float32
    out_shape = [out_struct(k.shape, out_dtype, q)] * 2
    if pieces is not None:
        out_specs += [pl.BlockSpec((None, bk, None, dp), lambda j, b, g: (b, jnp.minimum(j, n_extra - 1), g, 0))] * 2
        out_shape += [out_struct((batch, n_extra * bk, kv_heads, k.shape[3]), jnp.float32, q)] * 2
    dkdv_mask_inputs = mask.inputs(st, bq, bk, by_key=True)
    dkdv_options, dkdv_option_specs = _option_inputs(st, segments, None, bq, bk, by_key=True)
    dk, dv, *extra = pl.pallas_call(
        functools.partial(_dkdv_kernel, mask=mask, st=st, group=group, block_q=bq, block_k=bk, pieces=pieces),
        grid=(n_extra + pl.cdiv(kv_len, bk), batch, kv_heads),
        in_specs=[
            _whole_specs(dkdv_mask_inputs), dkdv_option_specs, q_all_spec, kv_all_spec, kv_all_spec, q_all_spec,
            row_all_spec, row_all_spec,
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=params,
        interpret=interpret,
        name="softmax_attention_bwd_dkdv",
    )(dkdv_mask_inputs, dkdv_options, q, k, v, do, lse, delta)
    if pieces is not None:
        keys = (pieces.tiles[:, None] * bk + np.arange(bk)).ravel()
        dk, dv = (x.at[:, keys].add(e, mode="drop").astype(k.dtype) for x, e in zip((dk, dv), extra))
    return dq, dk, dv


__all__ = ["KernelConfig", "backward", "config_for", "default_config", "forward", "sparse_config"]
