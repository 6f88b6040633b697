"""Decode attention (split-K flash-decoding) as a Pallas kernel for the Triton GPU lowering.

``q`` is ``[batch, t, heads, head_dim]``, the caches ``[batch, capacity, kv_heads, head_dim]`` with
``heads = kv_heads * group``; query head ``h`` reads KV head ``h // group``. ``lengths[b]`` counts the filled
slots of row ``b`` including the ``t`` new tokens: query ``r`` sits at ``i = lengths[b] - t + r``. Two static masks
share the kernel:

- windows: ``i`` sees slot ``j`` iff ``0 <= i - j < W_h`` (``W_h = windows[h]``, ``None`` = unlimited), which implies
  ``j < lengths[b]``;
- block-sparse: the causal BigBird rules of ``masks.SparseMask`` (local band, global tokens, the random blocks drawn
  for the query's block and head), random blocks drawn for ``cdiv(capacity, block_size)`` query blocks (a causal
  draw does not depend on that number, so it matches the prefill's).

One program owns a (split, batch row, KV head): it stacks the ``t * group`` queries of that KV group into one
``[rows, head_dim]`` tile (row ``r = query * group + head_in_group``, padded to a power of two >= 16), so K/V are
read once per group and every product is a 2-D ``tl.dot``. The entries a (row, KV head) loops over are: for
windows the key blocks bounded by ``lengths[b]`` and the group's largest window (a sliding window costs O(W) per row,
whatever the capacity); for a sparse mask a short sorted list of the blocks of the band, the global tokens and the
group's random blocks, built per (row, KV head) by a few XLA ops before the kernel (O(visible blocks), never
O(capacity)). They are dealt out in contiguous runs of one chunk size shared by the batch's rows (``_chunk``), so a
ragged batch's long rows get more splits than its short ones and no program carries much more than the average
(see ``_chunk`` and ``_Static.grid_splits``). Each split writes an unnormalised partial
``(acc, max, sum)`` and a jnp step merges them with log-sum-exp weights; attention sinks enter there, as one more
term of each query head's normaliser.

Scores are kept in base 2 (``exp(scale * x) == exp2(scale * log2(e) * x)``); a logit soft-cap
``cap * tanh(s / cap)`` is applied to the scaled scores in the kernel (a static flag: without it the kernel is
unchanged). Forward only: see ``decode_attention`` for what ``jax.grad`` does.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from pallas_kernels import _partitioning, reference
from pallas_kernels._autodiff import reject_higher_order
from pallas_kernels._vma import out_struct
from pallas_kernels.block_ranges import int_div
from pallas_kernels.masks import SparseMask, WindowMask

from . import fast_math
from .compiler import compiler_params, pl, plgpu
from .element_masks import SparseRows

# Stands in for an unlimited window; ``pos - window`` still fits int32.
_NO_WINDOW = 2**30
# Offset of the padding rows of the stacked query tile: a position before every slot, so they see nothing.
_NO_ROW = -(2**30)
# Start of an unused random key block: no slot is in ``[_NO_KEY, _NO_KEY + block_size)``.
_NO_KEY = -(2**30)
# Triton's ``tl.dot`` needs every operand dimension to be at least 16.
_MIN_BLOCK = 16
# Streaming multiprocessors of an H100/H200; the split heuristic aims for a few waves of programs over them.
_NUM_SMS = 132
_WAVES = 4
# Below this many key blocks per split, the merge costs more than the extra parallelism brings.
_MIN_BLOCKS_PER_SPLIT = 4
_LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Launch settings of the decode kernel; ``None`` fields are filled by ``default_config``.

    ``block_k``: cache slots per loop step (a power of two >= 16). ``num_splits``: programs the visible key range
    of each (batch row, KV head) is dealt across when all rows have the same length; with ragged lengths it is about
    the average, a row getting splits in proportion to its own visible blocks (see ``_chunk``).
    """

    block_k: int | None = None
    num_splits: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None

    def __post_init__(self):
        if self.block_k is not None and (self.block_k < _MIN_BLOCK or self.block_k & (self.block_k - 1)):
            raise ValueError(f"block_k={self.block_k} must be a power of two >= {_MIN_BLOCK}")
        for name in ("num_splits", "num_warps", "num_stages"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be >= 1")


def default_config(
    batch: int,
    kv_heads: int,
    capacity: int,
    span: int,
    rows: int,
    head_dim: int,
    dtype: Any,
    config: DecodeConfig | None = None,
) -> DecodeConfig:
    """Fills the ``None`` fields of ``config`` for one shape.

    ``span`` is a static bound on the slots one query group can see (``min(capacity, max_window + t - 1)``),
    ``rows`` the stacked query tile height. ``block_k`` keeps one K + V tile near 64 KiB; ``num_splits`` aims at
    ``_WAVES`` waves of programs over ``_NUM_SMS`` SMs, ``cdiv(4 * 132, batch * kv_heads)``, but never fewer than
    ``_MIN_BLOCKS_PER_SPLIT`` blocks per split.
    """
    config = DecodeConfig() if config is None else config
    row_bytes = _pow2_at_least(head_dim) * jnp.dtype(dtype).itemsize
    block_k = config.block_k
    if block_k is None:
        block_k = min(128 if row_bytes <= 256 else 64 if row_bytes <= 512 else 32, _pow2_at_least(capacity))
    num_splits = config.num_splits
    if num_splits is None:
        most = max(1, pl.cdiv(pl.cdiv(span, block_k), _MIN_BLOCKS_PER_SPLIT))
        num_splits = min(pl.cdiv(_WAVES * _NUM_SMS, batch * kv_heads), most)
    return DecodeConfig(
        block_k=block_k,
        num_splits=num_splits,
        num_warps=config.num_warps or (4 if rows <= 32 else 8),
        num_stages=config.num_stages or 2,
    )


def decode_attention(
    q: Float[Array, "batch t heads head_dim"],
    k_cache: Float[Array, "batch capacity kv_heads head_dim"],
    v_cache: Float[Array, "batch capacity kv_heads head_dim"],
    lengths: Int[Array, " batch"],
    *,
    windows: tuple[int | None, ...] | None = None,
    sparse_mask: SparseMask | None = None,
    softmax_scale: float,
    interpret: bool = False,
    config: DecodeConfig | None = None,
    xla_backward: bool = True,
    logits_soft_cap: float | None = None,
    sinks: Float[Array, " heads"] | None = None,
) -> Float[Array, "batch t heads head_dim"]:
    """Attention of ``t`` new queries per row against a preallocated cache; output in ``q.dtype``.

    The mask is ``windows`` (one window or ``None`` per query head) or ``sparse_mask`` (a causal ``SparseMask`` of
    ``heads`` heads): exactly one of them. ``logits_soft_cap``: scaled scores become ``cap * tanh(s / cap)`` before
    masking. ``sinks [heads]``: one logit per query head for a key every query sees, with value zero (it adds
    ``e^{sink_h}`` to the normaliser). Products run in the promoted dtype of the inputs (K/V tiles are cast after
    loading, the cache is never copied), accumulation in fp32. Rows whose queries see no slot output zeros (with
    sinks too). There is no backward kernel: ``xla_backward=True`` differentiates the XLA path under ``jax.grad``
    (``q``, the caches and ``sinks``), ``False`` makes ``jax.grad`` raise ``NotImplementedError``.
    """
    batch, t, heads, head_dim = q.shape
    _, capacity, kv_heads, _ = k_cache.shape
    if k_cache.shape != v_cache.shape or k_cache.shape[0] != batch or k_cache.shape[3] != head_dim:
        raise ValueError(f"incompatible shapes q={q.shape} k_cache={k_cache.shape} v_cache={v_cache.shape}")
    if heads % kv_heads:
        raise ValueError(f"heads={heads} must be a multiple of kv_heads={kv_heads}")
    if (windows is None) == (sparse_mask is None):
        raise ValueError("give exactly one of windows and sparse_mask")
    if sparse_mask is not None:
        if not isinstance(sparse_mask, SparseMask):
            raise TypeError(f"sparse_mask must be a SparseMask, got {sparse_mask!r}")
        if not sparse_mask.causal:
            raise ValueError("a non-causal SparseMask cannot be decoded: its queries see later positions")
        if sparse_mask.num_heads != heads:
            raise ValueError(f"sparse_mask has {sparse_mask.num_heads} heads, q has {heads}")
        mask: _Mask = _Sparse(sparse_mask)
    else:
        windows = tuple(windows)
        if len(windows) != heads or any(w is not None and w < 1 for w in windows):
            raise ValueError(f"need one window >= 1 (or None) per query head, got {windows} for {heads} heads")
        mask = _Windows(windows)
    if logits_soft_cap is not None:
        logits_soft_cap = float(logits_soft_cap)
        if not (math.isfinite(logits_soft_cap) and logits_soft_cap > 0):
            raise ValueError(f"logits_soft_cap must be None or a finite number > 0, got {logits_soft_cap}")
    if sinks is not None:
        sinks = jnp.asarray(sinks)
        if sinks.shape != (heads,) or not jnp.issubdtype(sinks.dtype, jnp.floating):
            raise ValueError(f"sinks must be a floating [heads] = ({heads},) array, got {sinks.shape} {sinks.dtype}")
    lengths = jnp.asarray(lengths, jnp.int32)
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape ({batch},), got {lengths.shape}")
    rows = _pow2_at_least(t * (heads // kv_heads))
    config = DecodeConfig() if config is None else config
    if config.block_k is None:
        block_k = default_config(batch, kv_heads, capacity, capacity, rows, head_dim, q.dtype).block_k
        config = dataclasses.replace(config, block_k=mask.block_k_hint(block_k))
    span = mask.span(t, heads // kv_heads, capacity, config.block_k)
    config = default_config(batch, kv_heads, capacity, span, rows, head_dim, q.dtype, config)
    return _decode(q, k_cache, v_cache, lengths, sinks, mask, float(softmax_scale), logits_soft_cap,
                   bool(interpret), config, bool(xla_backward))


# --------------------------------------------------------------------------------------------------------------
# Kernel.


class _Static(NamedTuple):
    """Trace-time constants of the kernel. ``batch``: rows of the call; ``max_entries``: a static bound on the
    entries (key blocks) one (row, KV head) loops over, 0 for unknown."""

    q_len: int
    capacity: int
    head_dim: int
    block_k: int
    num_splits: int
    softmax_scale: float
    logits_soft_cap: float | None = None
    fast_tanh: bool = False  # see fast_math
    batch: int = 1
    max_entries: int = 0

    @property
    def head_dim_padded(self) -> int:
        return _pow2_at_least(self.head_dim)

    @property
    def grid_splits(self) -> int:
        """The grid's split axis: the most splits any row may get, ``_chunk`` never giving a row more.

        A row gets ``cdiv(n_b, chunk)`` splits with ``chunk >= cdiv(N, num_splits * batch)`` (``N`` the batch's
        entries), i.e. about ``num_splits * batch * n_b / N``: never more than ``num_splits`` with one row, and about
        ``2 * num_splits`` for the longest row of a batch whose lengths are spread evenly over ``[0, capacity]``
        (``N ~ batch * n_max / 2``). Twice ``num_splits`` covers that; a more skewed batch (one long row among
        short ones) has its chunk raised to ``cdiv(n_max, grid_splits)``, about half the chunk of equal splits, where
        a larger axis would cost every call (uniform ones included) more empty programs and merged partials. Neither
        can a row need more than ``max(num_splits, cdiv(max_entries, _MIN_BLOCKS_PER_SPLIT))`` splits (the floor of
        ``_chunk``), so where the default ``num_splits`` already stops at that bound (short windows, small caches
        such as 4096 slots in blocks of 128, most sparse lists) ``grid_splits == num_splits``: there balancing only
        retires short rows' extra programs, and the longest row's programs (the critical path) stay as they were.

        Cost on a uniform batch (same ranges as equal splits): ``grid_splits - num_splits`` empty programs per
        (row, KV head), each storing a zero partial of ``rows * head_dim_padded`` floats, and as many more partials
        read by the merge. At the default config of 8 full rows of capacity 32768 (32 heads, 8 KV heads, head_dim
        128: 9 splits, 18 in the grid) that is about 10 MB against 1 GB of K/V (under 1%, estimated, not measured);
        it weighs more on uniform batches of rows much shorter than the capacity, whose few short programs are
        latency-bound anyway.
        """
        s = self.num_splits
        return min(min(self.batch, 2) * s, max(s, pl.cdiv(self.max_entries, _MIN_BLOCKS_PER_SPLIT)))


def _pow2_at_least(n: int) -> int:
    return max(_MIN_BLOCK, pl.next_power_of_2(n))


def _window_blocks(length: Int[Array, "*b"], max_window: Int[Array, ""], st: _Static
                   ) -> tuple[Int[Array, "*b"], Int[Array, "*b"]]:
    """Key blocks ``[first, last)`` holding a slot some query of a group may see under windows:
    ``[length - t - max_window + 1, length)`` clipped to the cache (elementwise over rows)."""
    bk = st.block_k
    kv_end = jnp.maximum(jnp.minimum(length, st.capacity), 0)
    first = int_div(jnp.maximum(length - st.q_len - max_window + 1, 0), bk)
    return first, jnp.maximum(_cdiv(kv_end, bk), first)


def _cdiv(x: Int[Array, "*b"], divisor: int) -> Int[Array, "*b"]:
    """``ceil(x / divisor)`` for ``x >= 0``."""
    return int_div(x + (divisor - 1), divisor)


def _chunk(entries: Int[Array, " batch"], st: _Static) -> Int[Array, ""]:
    """Entries per split, shared by the rows of one KV head: ``entries[b]`` is row ``b``'s count (0 on padding rows).

    ``cdiv(N, num_splits * batch)`` for the batch's ``N`` entries, so a row gets splits in proportion to its own
    entries and the active programs stay about ``num_splits * batch`` (at most ``num_splits * batch + batch``);
    raised to ``min(_MIN_BLOCKS_PER_SPLIT, cdiv(n_max, num_splits))`` so balancing never cuts chunks below the
    guidance where equal splits of the longest row kept to it, and to ``cdiv(n_max, grid_splits)`` so the longest
    row fits the grid. With equal counts it is ``cdiv(n, num_splits)``: the equal splits of every row, as before.
    """
    longest = jnp.max(entries)
    fair = _cdiv(jnp.sum(entries, dtype=entries.dtype), st.num_splits * st.batch)
    floor = jnp.minimum(_cdiv(longest, st.num_splits), _MIN_BLOCKS_PER_SPLIT)
    return jnp.maximum(jnp.maximum(fair, floor), jnp.maximum(_cdiv(longest, st.grid_splits), 1))


def _deal(first, last, split, chunk) -> tuple[Int[Array, ""], Int[Array, ""]]:
    """Run ``split`` of ``[first, last)`` cut into contiguous runs of ``chunk`` (empty past the end)."""
    start = jnp.minimum(first + split * chunk, last)
    return start, jnp.minimum(start + chunk, last)


def _load_kv(ref, slot_ok, st: _Static) -> Array:
    """Loads a ``[block_k, head_dim_padded]`` tile; slots outside ``slot_ok`` and padded columns read 0."""
    mask = slot_ok[:, None]
    if st.head_dim < st.head_dim_padded:
        mask = mask & (jnp.arange(st.head_dim_padded, dtype=jnp.int32) < st.head_dim)[None, :]
    return plgpu.load(ref, mask=mask, other=0.0)


def _scores(qk: Float[Array, "rows block_k"], st: _Static) -> Float[Array, "rows block_k"]:
    """Base-2 scores ``log2(e) * s`` of the products, ``s = scale * q.k``, soft-capped if the call asks for it."""
    if st.logits_soft_cap is None:
        return qk * (st.softmax_scale * _LOG2E)
    cap = st.logits_soft_cap
    return fast_math.tanh(qk * (st.softmax_scale / cap), st.fast_tanh) * (cap * _LOG2E)


def _decode_kernel(len_ref, off_ref, mask_refs, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, *, st: _Static,
                   mask: _Mask):
    """Grid ``(grid_splits, batch, kv_heads)``: one split of the visible key blocks against a stacked query tile.

    ``off_ref`` gives per stacked row its position relative to ``lengths[b]`` (``_NO_ROW`` on padding rows: nothing
    visible); ``q_ref`` is ``[rows, head_dim_padded]``, zero-padded; ``mask_refs`` are the mask's ``inputs``.
    """
    split, b, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bk = st.block_k
    length = len_ref[b]
    q_pos = length + plgpu.load(off_ref)
    q = plgpu.load(q_ref)
    program = mask.program(mask_refs, b, g, length, plgpu.load(len_ref), q_pos, st)

    def step(e, carry):
        acc, m, l = carry
        kb = program.block(e)
        k_pos = kb * bk + jnp.arange(bk, dtype=jnp.int32)
        # Slots no stacked query sees (unfilled ones included) are loaded as zeros, so whatever they hold (even NaN)
        # never reaches an output.
        slot_ok, visible = program.masks(k_pos)
        slots = pl.ds(kb * bk, bk)
        k = _load_kv(k_ref.at[slots, :], slot_ok, st).astype(q.dtype)
        v = _load_kv(v_ref.at[slots, :], slot_ok, st).astype(q.dtype)
        s = jnp.where(visible, _scores(plgpu.dot(q, k, trans_b=True), st), -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        # A row with nothing visible so far keeps m = -inf; subtract 0 instead so exp2 gives 0 rather than NaN.
        m_sub = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp2(m - m_sub)
        p = jnp.exp2(s - m_sub[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v)
        return acc, m_new, l

    rows = q.shape[0]
    carry = (
        jnp.zeros((rows, st.head_dim_padded), jnp.float32),
        jnp.full((rows,), -jnp.inf, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    first, last = program.entries
    start, end = _deal(first, last, split, _chunk(program.batch_counts, st))
    acc, m, l = lax.fori_loop(start, end, step, carry)
    plgpu.store(acc_ref, acc)
    plgpu.store(m_ref, m)
    plgpu.store(l_ref, l)


# --------------------------------------------------------------------------------------------------------------
# Masks. A static mask (``_Windows`` or ``_Sparse``, a jit static argument) builds the arrays its kernel reads
# (``inputs``, with their ``BlockSpec``s) and, inside the kernel, a program view: the entries ``[first, last)`` of its
# (row, KV head) and the entry counts of every row of its KV head (which the kernel deals out to the splits), the key
# block of an entry, and per key block which slots to load and which (row, slot) pairs are visible.


class _Layout(NamedTuple):
    """Static shape facts of one call that the masks' ``inputs`` need."""

    batch: int
    t: int
    group: int
    kv_heads: int
    rows: int
    capacity: int
    block_k: int


@dataclasses.dataclass(frozen=True)
class _Windows:
    """Per-head windows (``None`` = unlimited), causal."""

    windows: tuple[int | None, ...]

    @property
    def num_heads(self) -> int:
        return len(self.windows)

    def heads(self, start: int, count: int) -> _Windows:
        return _Windows(self.windows[start:start + count])

    @property
    def definition(self) -> WindowMask:
        return WindowMask(self.windows, causal=True)

    def block_k_hint(self, block_k: int) -> int:
        return block_k

    def span(self, t: int, group: int, capacity: int, block_k: int) -> int:
        """A static bound on the slots one query group sees."""
        return min(capacity, max(_NO_WINDOW if w is None else w for w in self.windows) + t - 1)

    def xla_visible(self, q_pos, k_pos, capacity: int):
        return self.definition.visible(q_pos, k_pos)

    def inputs(self, lengths, offset, lay: _Layout) -> tuple[dict[str, Array], dict[str, pl.BlockSpec]]:
        """int32 ``window [kv_heads, rows]`` of the stacked rows (0 on padding rows: nothing visible)."""
        window = np.zeros((lay.kv_heads, lay.rows), np.int32)
        for r in range(lay.t * lay.group):
            for g in range(lay.kv_heads):
                w = self.windows[g * lay.group + r % lay.group]
                window[g, r] = _NO_WINDOW if w is None else min(w, _NO_WINDOW)
        spec = pl.BlockSpec((None, lay.rows), lambda s, b, g: (g, 0))
        return {"window": jnp.asarray(window)}, {"window": spec}

    def program(self, refs, b, g, length, lengths, q_pos, st: _Static) -> _WindowProgram:
        window = plgpu.load(refs["window"])
        max_window = jnp.max(window)
        first, last = _window_blocks(lengths, max_window, st)
        return _WindowProgram(window, max_window, q_pos, length, _window_blocks(length, max_window, st), last - first,
                              st)


class _WindowProgram(NamedTuple):
    window: Int[Array, " rows"]
    max_window: Int[Array, ""]
    q_pos: Int[Array, " rows"]
    length: Int[Array, ""]
    entries: tuple[Int[Array, ""], Int[Array, ""]]
    batch_counts: Int[Array, " batch"]
    st: _Static

    def block(self, e) -> Int[Array, ""]:
        return e

    def masks(self, k_pos) -> tuple[Bool[Array, " block_k"], Bool[Array, "rows block_k"]]:
        kv_end = jnp.minimum(self.length, self.st.capacity)
        # The earliest slot some stacked query sees.
        first_seen = self.length - self.st.q_len - self.max_window + 1
        slot_ok = (k_pos < kv_end) & (k_pos >= first_seen)
        d = self.q_pos[:, None] - k_pos[None, :]
        return slot_ok, (d >= 0) & (d < self.window[:, None]) & slot_ok[None, :]


@dataclasses.dataclass(frozen=True)
class _Sparse:
    """A causal ``SparseMask``: per (batch row, KV head) a sorted list of the key blocks its queries may see drives
    the loop, the mask's rules the element mask."""

    sparse: SparseMask

    @property
    def num_heads(self) -> int:
        return self.sparse.num_heads

    def heads(self, start: int, count: int) -> _Sparse:
        return _Sparse(self.sparse.heads(start, count))

    @property
    def definition(self) -> SparseMask:
        return self.sparse

    def block_k_hint(self, block_k: int) -> int:
        """Key blocks no larger than a mask block where that is a power of two >= 16, so they do not straddle one."""
        bs = self.sparse.block_size
        return min(block_k, bs) if bs >= _MIN_BLOCK and not bs & (bs - 1) else block_k

    def bounds(self, t: int, group: int, capacity: int, block_k: int) -> tuple[int, int, int, int]:
        """Static sizes: kernel blocks of the band, of the global tokens, of one random block, and the most entries a
        (batch row, KV head) list can hold."""
        sp, n_kb = self.sparse, pl.cdiv(capacity, block_k)
        # The band of the t queries spans at most t + L * bs - 1 positions ending at lengths[b] - 1.
        n_band = min(n_kb, pl.cdiv(t + sp.num_local_blocks * sp.block_size - 1, block_k) + 1)
        n_global = min(n_kb, pl.cdiv(sp.num_global_tokens, block_k))
        bs = sp.block_size
        # Kernel blocks one random block (bs slots from a multiple of bs) can cross.
        per_random = min(n_kb, bs // block_k if bs % block_k == 0 else 1 if block_k % bs == 0 else
                         (bs - 1) // block_k + 2)
        n_random = t * group * sp.num_random_blocks * per_random
        return n_band, n_global, per_random, min(n_kb, n_band + n_global + n_random)

    def span(self, t: int, group: int, capacity: int, block_k: int) -> int:
        return min(capacity, self.bounds(t, group, capacity, block_k)[3] * block_k)

    def num_blocks(self, capacity: int) -> int:
        """Query blocks of the random table: every position of the cache."""
        return pl.cdiv(capacity, self.sparse.block_size)

    def xla_visible(self, q_pos, k_pos, capacity: int):
        return self.sparse.visible(q_pos, k_pos, self.num_blocks(capacity))

    def inputs(self, lengths, offset, lay: _Layout) -> tuple[dict[str, Array], dict[str, pl.BlockSpec]]:
        """``blocks [batch, kv_heads, entries]``: the kernel key blocks some query of the group may see, ascending,
        without repeats; ``counts [batch, kv_heads]`` (batch padded to a power of two with zeros): how many;
        ``random [batch, kv_heads, slots, rows]`` (if the mask has random blocks): the first slot of each random
        block of each stacked row, ``_NO_KEY`` where unused.

        A program reads the counts of its KV head's rows, to share one chunk between them (``_chunk``), as under
        windows. Balancing gains little here: the lists differ little between rows (the band, global tokens and
        random blocks; only rows shorter than the band hold fewer) and are short (``bounds``), so the default
        ``num_splits`` is mostly already at ``cdiv(entries, _MIN_BLOCKS_PER_SPLIT)`` and ``grid_splits`` stays at
        or near ``num_splits``. It is kept so that one dealing serves both masks."""
        sp, bk = self.sparse, lay.block_k
        bs, n_kb = sp.block_size, pl.cdiv(lay.capacity, bk)
        n_band, n_global, per_random, n_entries = self.bounds(lay.t, lay.group, lay.capacity, bk)
        batch, kvh = lay.batch, lay.kv_heads
        lengths = lengths.astype(jnp.int32)
        full = lambda x: jnp.broadcast_to(x[:, None, :], (batch, kvh, x.shape[-1]))
        # Candidates, n_kb where unused: the band of the t queries (contiguous, up to the last filled slot) ...
        band_first = jnp.maximum(((lengths - lay.t) // bs - (sp.num_local_blocks - 1)) * bs, 0) // bk
        kb = band_first[:, None] + jnp.arange(n_band, dtype=jnp.int32)
        candidates = [full(jnp.where(kb <= ((lengths - 1) // bk)[:, None], kb, n_kb))]
        # ... the global tokens that are filled ...
        if n_global:
            kb = jnp.arange(n_global, dtype=jnp.int32)[None, :]
            candidates.append(full(jnp.where(kb * bk < jnp.minimum(sp.num_global_tokens, lengths)[:, None], kb, n_kb)))
        arrays = {}
        specs = {}
        # ... and the random blocks of each real stacked row's query block and head.
        r = sp.num_random_blocks
        if r:
            nb = self.num_blocks(lay.capacity)
            head = (np.arange(kvh)[:, None] * lay.group + np.arange(lay.rows)[None, :] % lay.group).astype(np.int32)
            q_block = jnp.clip((lengths[:, None] + offset[None, :]) // bs, 0, nb - 1)  # [batch, rows]
            table = jnp.asarray(sp.random_blocks(nb))  # [heads, nb, r]
            chosen = table[jnp.asarray(head)[None], q_block[:, None, :]]  # [batch, kvh, rows, r]
            start = chosen * bs
            real = chosen[:, :, : lay.t * lay.group]
            kb = (real * bs // bk)[..., None] + jnp.arange(per_random, dtype=jnp.int32)
            used = (real >= 0)[..., None] & (kb * bk < (real * bs + bs)[..., None])
            candidates.append(jnp.where(used, kb, n_kb).reshape(batch, kvh, -1))
            starts = jnp.where(chosen >= 0, start, _NO_KEY).transpose(0, 1, 3, 2)
            slots = pl.next_power_of_2(r)
            arrays["random"] = jnp.pad(starts, ((0, 0), (0, 0), (0, slots - r), (0, 0)), constant_values=_NO_KEY)
            specs["random"] = pl.BlockSpec((None, None, slots, lay.rows), lambda s, b, g: (b, g, 0, 0))
        blocks = jnp.sort(jnp.concatenate(candidates, axis=-1), axis=-1)
        repeat = jnp.concatenate([jnp.zeros((batch, kvh, 1), bool), blocks[..., 1:] == blocks[..., :-1]], axis=-1)
        blocks = jnp.sort(jnp.where(repeat, n_kb, blocks), axis=-1)[..., :n_entries]
        counts = jnp.sum(blocks < n_kb, axis=-1, dtype=jnp.int32)
        width = pl.next_power_of_2(n_entries)
        arrays["blocks"] = jnp.pad(blocks, ((0, 0), (0, 0), (0, width - n_entries)), constant_values=n_kb)
        specs["blocks"] = pl.BlockSpec((None, None, width), lambda s, b, g: (b, g, 0))
        padded = pl.next_power_of_2(batch)
        arrays["counts"] = jnp.pad(counts, ((0, padded - batch), (0, 0)))
        specs["counts"] = pl.BlockSpec((padded, None), lambda s, b, g: (0, g))
        return arrays, specs

    def program(self, refs, b, g, length, lengths, q_pos, st: _Static) -> _SparseProgram:
        sp = self.sparse
        random = tuple(plgpu.load(refs["random"].at[jnp.int32(slot), :]) for slot in range(sp.num_random_blocks))
        entries = (jnp.int32(0), refs["counts"][b])
        return _SparseProgram(refs["blocks"], entries, plgpu.load(refs["counts"]),
                              SparseRows.at(q_pos, random, sp, st.capacity))


class _SparseProgram(NamedTuple):
    blocks_ref: Any
    entries: tuple[Int[Array, ""], Int[Array, ""]]
    batch_counts: Int[Array, " batch"]
    rows: SparseRows

    def block(self, e) -> Int[Array, ""]:
        return self.blocks_ref[e]

    def masks(self, k_pos) -> tuple[Bool[Array, " block_k"], Bool[Array, "rows block_k"]]:
        """``SparseMask.visible`` of the stacked rows (rows at negative positions see nothing: causality); a slot is
        loaded iff some row sees it."""
        visible = self.rows.visible(k_pos)
        return jnp.max(visible.astype(jnp.int32), axis=0) > 0, visible


_Mask = _Windows | _Sparse


def _row_offsets(t: int, group: int, rows: int) -> np.ndarray:
    """int32 ``[rows]``: each stacked row's position relative to ``lengths[b]``, ``_NO_ROW`` on padding rows."""
    offset = np.full((rows,), _NO_ROW, np.int32)
    offset[: t * group] = np.arange(t * group) // group - t
    return offset


@functools.partial(jax.jit, static_argnums=(5, 6, 7, 8, 9))
def _forward(
    q: Float[Array, "batch t heads head_dim"],
    k_cache: Float[Array, "batch capacity kv_heads head_dim"],
    v_cache: Float[Array, "batch capacity kv_heads head_dim"],
    lengths: Int[Array, " batch"],
    sinks: Float[Array, " heads"] | None,
    mask: _Mask,
    softmax_scale: float,
    logits_soft_cap: float | None,
    interpret: bool,
    config: DecodeConfig,
) -> Float[Array, "batch t heads head_dim"]:
    batch, t, heads, head_dim = q.shape
    capacity, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    span = mask.span(t, group, capacity, config.block_k)
    # A span can straddle one block more than it fills.
    max_entries = min(pl.cdiv(capacity, config.block_k), pl.cdiv(span, config.block_k) + 1)
    st = _Static(t, capacity, head_dim, config.block_k, config.num_splits, softmax_scale, logits_soft_cap,
                 fast_math.approximate_tanh_for(q.dtype, interpret), batch, max_entries)
    rows, dp, splits = _pow2_at_least(t * group), st.head_dim_padded, st.grid_splits
    offset = _row_offsets(t, group, rows)
    lay = _Layout(batch, t, group, kv_heads, rows, capacity, config.block_k)
    mask_inputs, mask_specs = mask.inputs(lengths, jnp.asarray(offset), lay)

    # Stacked rows r = query * group + head_in_group, in the compute dtype, zero-padded to [rows, head_dim_padded].
    q_rows = q.reshape(batch, t, kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
    q_rows = q_rows.reshape(batch, kv_heads, t * group, head_dim)
    q_rows = q_rows.astype(jnp.result_type(q, k_cache, v_cache))
    q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, rows - t * group), (0, dp - head_dim)))
    padded_lengths = jnp.pad(lengths, (0, pl.next_power_of_2(batch) - batch))

    kv_rows = max(pl.next_power_of_2(capacity), st.block_k)
    kv_spec = pl.BlockSpec((None, kv_rows, None, dp), lambda s, b, g: (b, 0, g, 0))
    part_spec = pl.BlockSpec((None, None, None, rows), lambda s, b, g: (b, g, s, 0))
    part_shape = out_struct((batch, kv_heads, splits, rows), jnp.float32, q)
    acc, m, l = pl.pallas_call(
        functools.partial(_decode_kernel, st=st, mask=mask),
        grid=(splits, batch, kv_heads),
        in_specs=[
            pl.BlockSpec(padded_lengths.shape, lambda s, b, g: (0,)),
            pl.BlockSpec((rows,), lambda s, b, g: (0,)),
            mask_specs,
            pl.BlockSpec((None, None, rows, dp), lambda s, b, g: (b, g, 0, 0)),
            kv_spec,
            kv_spec,
        ],
        out_specs=[pl.BlockSpec((None, None, None, rows, dp), lambda s, b, g: (b, g, s, 0, 0)), part_spec, part_spec],
        out_shape=[out_struct((batch, kv_heads, splits, rows, dp), jnp.float32, q), part_shape, part_shape],
        compiler_params=compiler_params(config.num_warps, config.num_stages),
        interpret=interpret,
        name="decode_attention",
    )(padded_lengths, jnp.asarray(offset), mask_inputs, q_rows, k_cache, v_cache)

    # Merge the splits: weights exp2(m_s - max_s m_s); a sink is one more term exp2(sink2 - max) of its rows'
    # normaliser (sink2 = log2(e) * sink). Rows that saw nothing and have no sink (all m_s = -inf) output 0.
    m_max = jnp.max(m, axis=2)
    if sinks is not None:
        head = np.arange(kv_heads)[:, None] * group + np.arange(rows)[None, :] % group
        real = np.arange(rows) < t * group
        sink2 = jnp.where(real, sinks.astype(jnp.float32)[head] * _LOG2E, -jnp.inf)  # [kv_heads, rows]
        m_max = jnp.maximum(m_max, sink2)
    m_max = jnp.where(m_max == -jnp.inf, 0.0, m_max)
    weight = jnp.exp2(m - m_max[:, :, None])
    total = jnp.sum(weight * l, axis=2)
    if sinks is not None:
        total = total + jnp.exp2(sink2 - m_max)
    out = jnp.sum(weight[..., None] * acc, axis=2) / jnp.where(total == 0.0, 1.0, total)[..., None]
    out = out[:, :, : t * group, :head_dim].reshape(batch, kv_heads, t, group, head_dim)
    return out.transpose(0, 2, 1, 3, 4).reshape(q.shape).astype(q.dtype)


# --------------------------------------------------------------------------------------------------------------
# custom_vjp glue: no backward kernel (decoding needs none); the gradient is the XLA path's, or an error.


def _xla_decode(q, k_cache, v_cache, lengths, sinks, mask: _Mask, softmax_scale, logits_soft_cap):
    capacity = k_cache.shape[1]
    q_pos, k_pos = reference.cache_positions(lengths, q.shape[1], capacity)
    visible = mask.xla_visible(q_pos, k_pos, capacity)
    return reference.softmax_attention(q, k_cache, v_cache, visible, softmax_scale, logits_soft_cap, sinks)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10))
def _decode(q, k_cache, v_cache, lengths, sinks, mask, softmax_scale, logits_soft_cap, interpret, config,
            xla_backward):
    return _partitioned_forward(q, k_cache, v_cache, lengths, sinks, mask, softmax_scale, logits_soft_cap,
                                interpret, config)


def _partitioned_forward(q, k_cache, v_cache, lengths, sinks, mask: _Mask, softmax_scale, logits_soft_cap,
                         interpret, config):
    """``_forward``, each device running its batch rows and heads under ``jit`` with sharded inputs."""

    def kernel(q, k_cache, v_cache, lengths, *rest, head_shard=None):
        local_sinks = rest[0] if rest else None
        run = lambda local: _forward(q, k_cache, v_cache, lengths, local_sinks, local, softmax_scale,
                                     logits_soft_cap, interpret, config)
        if head_shard is None:  # every head has the same mask: any slice of it is the local one
            return run(mask if q.shape[2] == mask.num_heads else mask.heads(0, q.shape[2]))
        # Per-head windows or random blocks: the mask of the device's global heads (one static branch per shard).
        return _partitioning.per_head_shard(run, mask, *head_shard)

    arrays = (q, k_cache, v_cache, lengths) + (() if sinks is None else (sinks,))
    if not _partitioning.wanted():
        return kernel(*arrays)
    return _partitioning.partitioned(
        kernel, ("b.h.", "b.k.", "b.k.", "b", "h")[: len(arrays)], ("b.h.",), group=q.shape[2] // k_cache.shape[2],
        head_dependent=mask.definition.differs_between_heads,
    )(*arrays)


def _decode_fwd(q, k_cache, v_cache, lengths, sinks, mask, softmax_scale, logits_soft_cap, interpret, config,
                xla_backward):
    reject_higher_order("decode_attention", q, k_cache, v_cache, sinks)
    out = _partitioned_forward(q, k_cache, v_cache, lengths, sinks, mask, softmax_scale, logits_soft_cap,
                               interpret, config)
    return out, (q, k_cache, v_cache, lengths, sinks)


def _decode_bwd(mask, softmax_scale, logits_soft_cap, interpret, config, xla_backward, res, d_out):
    if not xla_backward:
        raise NotImplementedError(
            "decode_attention has no Pallas backward kernel; differentiate it with implementation='xla' or 'auto'"
        )
    q, k_cache, v_cache, lengths, sinks = res
    xla = lambda q, k, v, sinks: _xla_decode(q, k, v, lengths, sinks, mask, softmax_scale, logits_soft_cap)
    _, vjp = jax.vjp(xla, q, k_cache, v_cache, sinks)
    dq, dk, dv, d_sinks = vjp(d_out)
    return dq, dk, dv, np.zeros(lengths.shape, jax.dtypes.float0), d_sinks


_decode.defvjp(_decode_fwd, _decode_bwd)


__all__ = ["DecodeConfig", "decode_attention", "default_config"]
