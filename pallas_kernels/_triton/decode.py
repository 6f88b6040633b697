"""Decode attention (split-K flash-decoding) as a Pallas kernel for the Triton GPU lowering.

``q`` is ``[batch, t, heads, head_dim]``, the caches ``[batch, capacity, kv_heads, head_dim]`` with
``heads = kv_heads * group``; query head ``h`` reads KV head ``h // group``. ``lengths[b]`` counts the filled
slots of row ``b`` including the ``t`` new tokens: query ``r`` sits at ``i = lengths[b] - t + r`` and sees slot
``j`` iff ``0 <= i - j < W_h`` (``W_h = windows[h]``, ``None`` = unlimited), which implies ``j < lengths[b]``.

One program owns a (split, batch row, KV head): it stacks the ``t * group`` queries of that KV group into one
``[rows, head_dim]`` tile (row ``r = query * group + head_in_group``, padded to a power of two >= 16), so K/V are
read once per group and every product is a 2-D ``tl.dot``. The blocks that can hold a visible slot (bounded by
``lengths[b]`` and the group's largest window) are dealt out to the splits in equal contiguous runs; each split
writes an unnormalised partial ``(acc, max, sum)`` and a jnp step merges them with log-sum-exp weights. A
sliding window therefore costs O(W) per row, whatever the capacity of the cache.

Scores are kept in base 2 (``exp(scale * x) == exp2(scale * log2(e) * x)``). Forward only: see
``decode_attention`` for what ``jax.grad`` does.
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
from jaxtyping import Array, Float, Int

from pallas_kernels import _partitioning, reference
from pallas_kernels._autodiff import reject_higher_order
from pallas_kernels._vma import out_struct
from pallas_kernels.block_ranges import int_div
from pallas_kernels.masks import WindowMask

from .compiler import compiler_params, pl, plgpu

# Stands in for an unlimited window; ``pos - window`` still fits int32.
_NO_WINDOW = 2**30
# Triton's ``tl.dot`` needs every operand dimension to be at least 16.
_MIN_BLOCK = 16
# Streaming multiprocessors of an H100/H200; the split heuristic aims for a few waves of programs over them.
_NUM_SMS = 132
_WAVES = 4
# Below this many key blocks per split, the merge costs more than the extra parallelism brings.
_MIN_BLOCKS_PER_SPLIT = 4


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Launch settings of the decode kernel; ``None`` fields are filled by ``default_config``.

    ``block_k``: cache slots per loop step (a power of two >= 16). ``num_splits``: programs the visible key range
    of each (batch row, KV head) is dealt across.
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
    windows: tuple[int | None, ...],
    softmax_scale: float,
    interpret: bool = False,
    config: DecodeConfig | None = None,
    xla_backward: bool = True,
) -> Float[Array, "batch t heads head_dim"]:
    """Attention of ``t`` new queries per row against a preallocated cache; output in ``q.dtype``.

    Products run in the promoted dtype of the inputs (K/V tiles are cast after loading, the cache is never
    copied), accumulation in fp32. Rows whose queries see no slot (``lengths[b] - t + r < 0``) output zeros.
    There is no backward kernel: ``xla_backward=True`` differentiates the XLA path under ``jax.grad``, ``False``
    makes ``jax.grad`` raise ``NotImplementedError``.
    """
    batch, t, heads, head_dim = q.shape
    _, capacity, kv_heads, _ = k_cache.shape
    if k_cache.shape != v_cache.shape or k_cache.shape[0] != batch or k_cache.shape[3] != head_dim:
        raise ValueError(f"incompatible shapes q={q.shape} k_cache={k_cache.shape} v_cache={v_cache.shape}")
    if heads % kv_heads:
        raise ValueError(f"heads={heads} must be a multiple of kv_heads={kv_heads}")
    windows = tuple(windows)
    if len(windows) != heads or any(w is not None and w < 1 for w in windows):
        raise ValueError(f"need one window >= 1 (or None) per query head, got {windows} for {heads} heads")
    lengths = jnp.asarray(lengths, jnp.int32)
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape ({batch},), got {lengths.shape}")
    max_window = max(_NO_WINDOW if w is None else w for w in windows)
    span = min(capacity, max_window + t - 1)
    rows = _pow2_at_least(t * (heads // kv_heads))
    config = default_config(batch, kv_heads, capacity, span, rows, head_dim, q.dtype, config)
    return _decode(q, k_cache, v_cache, lengths, windows, float(softmax_scale), bool(interpret), config,
                   bool(xla_backward))


# --------------------------------------------------------------------------------------------------------------
# Kernel.


class _Static(NamedTuple):
    """Trace-time constants of the kernel."""

    q_len: int
    capacity: int
    head_dim: int
    block_k: int
    num_splits: int
    softmax_scale: float

    @property
    def head_dim_padded(self) -> int:
        return _pow2_at_least(self.head_dim)


def _pow2_at_least(n: int) -> int:
    return max(_MIN_BLOCK, pl.next_power_of_2(n))


def _split_blocks(
    length: Int[Array, ""], max_window: Int[Array, ""], split: Int[Array, ""], st: _Static
) -> tuple[Int[Array, ""], Int[Array, ""]]:
    """Key blocks ``[start, end)`` of program ``split``.

    The blocks holding a slot some query of the group may see, ``[length - t - max_window + 1, length)`` clipped
    to the cache, are dealt out in equal contiguous runs; splits past the end get an empty range.
    """
    bk, s = st.block_k, st.num_splits
    kv_end = jnp.maximum(jnp.minimum(length, st.capacity), 0)
    first = int_div(jnp.maximum(length - st.q_len - max_window + 1, 0), bk)
    last = jnp.maximum(int_div(kv_end + bk - 1, bk), first)
    per_split = int_div(last - first + s - 1, s)
    start = jnp.minimum(first + split * per_split, last)
    return start, jnp.minimum(start + per_split, last)


def _load_kv(ref, slot_ok, st: _Static) -> Array:
    """Loads a ``[block_k, head_dim_padded]`` tile; slots outside the filled cache and padded columns read 0."""
    mask = slot_ok[:, None]
    if st.head_dim < st.head_dim_padded:
        mask = mask & (jnp.arange(st.head_dim_padded, dtype=jnp.int32) < st.head_dim)[None, :]
    return plgpu.load(ref, mask=mask, other=0.0)


def _decode_kernel(len_ref, w_ref, off_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, *, st: _Static):
    """Grid ``(num_splits, batch, kv_heads)``: one split of the visible key range against a stacked query tile.

    ``w_ref``/``off_ref`` give per stacked row its window (0 on padding rows: nothing visible) and its position
    relative to ``lengths[b]``; ``q_ref`` is ``[rows, head_dim_padded]``, zero-padded.
    """
    split, b = pl.program_id(0), pl.program_id(1)
    bk = st.block_k
    length = len_ref[b]
    window = plgpu.load(w_ref)
    q_pos = length + plgpu.load(off_ref)
    q = plgpu.load(q_ref)
    kv_end = jnp.minimum(length, st.capacity)
    max_window = jnp.max(window)
    # The earliest slot some stacked query sees; earlier ones, and unfilled ones, are loaded as zeros, so whatever
    # they hold (even NaN) never reaches an output.
    first_seen = length - st.q_len - max_window + 1
    qk_scale = st.softmax_scale * math.log2(math.e)

    def step(kb, carry):
        acc, m, l = carry
        k_pos = kb * bk + jnp.arange(bk, dtype=jnp.int32)
        slot_ok = (k_pos < kv_end) & (k_pos >= first_seen)
        slots = pl.ds(kb * bk, bk)
        k = _load_kv(k_ref.at[slots, :], slot_ok, st).astype(q.dtype)
        v = _load_kv(v_ref.at[slots, :], slot_ok, st).astype(q.dtype)
        s = plgpu.dot(q, k, trans_b=True) * qk_scale
        d = q_pos[:, None] - k_pos[None, :]
        s = jnp.where((d >= 0) & (d < window[:, None]) & slot_ok[None, :], s, -jnp.inf)
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
    start, end = _split_blocks(length, max_window, split, st)
    acc, m, l = lax.fori_loop(start, end, step, carry)
    plgpu.store(acc_ref, acc)
    plgpu.store(m_ref, m)
    plgpu.store(l_ref, l)


def _row_tables(windows: tuple[int | None, ...], kv_heads: int, t: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """int32 windows ``[kv_heads, rows]`` and offsets from ``lengths[b]`` ``[rows]`` of the stacked query rows."""
    group = len(windows) // kv_heads
    window = np.zeros((kv_heads, rows), np.int32)
    offset = np.zeros((rows,), np.int32)
    for r in range(t * group):
        offset[r] = r // group - t
        for g in range(kv_heads):
            w = windows[g * group + r % group]
            window[g, r] = _NO_WINDOW if w is None else min(w, _NO_WINDOW)
    return window, offset


@functools.partial(jax.jit, static_argnums=(4, 5, 6, 7))
def _forward(
    q: Float[Array, "batch t heads head_dim"],
    k_cache: Float[Array, "batch capacity kv_heads head_dim"],
    v_cache: Float[Array, "batch capacity kv_heads head_dim"],
    lengths: Int[Array, " batch"],
    windows: tuple[int | None, ...],
    softmax_scale: float,
    interpret: bool,
    config: DecodeConfig,
) -> Float[Array, "batch t heads head_dim"]:
    batch, t, heads, head_dim = q.shape
    capacity, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    st = _Static(t, capacity, head_dim, config.block_k, config.num_splits, softmax_scale)
    rows, dp, splits = _pow2_at_least(t * group), st.head_dim_padded, st.num_splits
    window, offset = _row_tables(windows, kv_heads, t, rows)

    # Stacked rows r = query * group + head_in_group, in the compute dtype, zero-padded to [rows, head_dim_padded].
    q_rows = q.reshape(batch, t, kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
    q_rows = q_rows.reshape(batch, kv_heads, t * group, head_dim)
    q_rows = q_rows.astype(jnp.result_type(q, k_cache, v_cache))
    q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, rows - t * group), (0, dp - head_dim)))
    lengths = jnp.pad(lengths, (0, pl.next_power_of_2(batch) - batch))

    kv_rows = max(pl.next_power_of_2(capacity), st.block_k)
    kv_spec = pl.BlockSpec((None, kv_rows, None, dp), lambda s, b, g: (b, 0, g, 0))
    part_spec = pl.BlockSpec((None, None, None, rows), lambda s, b, g: (b, g, s, 0))
    part_shape = out_struct((batch, kv_heads, splits, rows), jnp.float32, q)
    acc, m, l = pl.pallas_call(
        functools.partial(_decode_kernel, st=st),
        grid=(splits, batch, kv_heads),
        in_specs=[
            pl.BlockSpec(lengths.shape, lambda s, b, g: (0,)),
            pl.BlockSpec((None, rows), lambda s, b, g: (g, 0)),
            pl.BlockSpec((rows,), lambda s, b, g: (0,)),
            pl.BlockSpec((None, None, rows, dp), lambda s, b, g: (b, g, 0, 0)),
            kv_spec,
            kv_spec,
        ],
        out_specs=[pl.BlockSpec((None, None, None, rows, dp), lambda s, b, g: (b, g, s, 0, 0)), part_spec, part_spec],
        out_shape=[out_struct((batch, kv_heads, splits, rows, dp), jnp.float32, q), part_shape, part_shape],
        compiler_params=compiler_params(config.num_warps, config.num_stages),
        interpret=interpret,
        name="decode_attention",
    )(lengths, jnp.asarray(window), jnp.asarray(offset), q_rows, k_cache, v_cache)

    # Merge the splits: weights exp2(m_s - max_s m_s); rows that saw nothing (all m_s = -inf) output 0.
    m_max = jnp.max(m, axis=2, keepdims=True)
    weight = jnp.exp2(m - jnp.where(m_max == -jnp.inf, 0.0, m_max))
    total = jnp.sum(weight * l, axis=2)
    out = jnp.sum(weight[..., None] * acc, axis=2) / jnp.where(total == 0.0, 1.0, total)[..., None]
    out = out[:, :, : t * group, :head_dim].reshape(batch, kv_heads, t, group, head_dim)
    return out.transpose(0, 2, 1, 3, 4).reshape(q.shape).astype(q.dtype)


# --------------------------------------------------------------------------------------------------------------
# custom_vjp glue: no backward kernel (decoding needs none); the gradient is the XLA path's, or an error.


def _xla_decode(q, k_cache, v_cache, lengths, windows, softmax_scale):
    q_pos, k_pos = reference.cache_positions(lengths, q.shape[1], k_cache.shape[1])
    visible = WindowMask(windows, causal=True).visible(q_pos, k_pos)
    return reference.softmax_attention(q, k_cache, v_cache, visible, softmax_scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _decode(q, k_cache, v_cache, lengths, windows, softmax_scale, interpret, config, xla_backward):
    return _partitioned_forward(q, k_cache, v_cache, lengths, windows, softmax_scale, interpret, config)


def _partitioned_forward(q, k_cache, v_cache, lengths, windows, softmax_scale, interpret, config):
    """``_forward``, each device running its batch rows and heads under ``jit`` with sharded inputs."""

    def kernel(q, k_cache, v_cache, lengths):
        # Heads are only split when every head has the same window: any slice of ``windows`` is the local one.
        return _forward(q, k_cache, v_cache, lengths, windows[: q.shape[2]], softmax_scale, interpret, config)

    if not _partitioning.wanted():
        return kernel(q, k_cache, v_cache, lengths)
    return _partitioning.partitioned(
        kernel, ("b.h.", "b.k.", "b.k.", "b"), ("b.h.",), group=q.shape[2] // k_cache.shape[2],
        heads_splittable=len(set(windows)) == 1,
    )(q, k_cache, v_cache, lengths)


def _decode_fwd(q, k_cache, v_cache, lengths, windows, softmax_scale, interpret, config, xla_backward):
    reject_higher_order("decode_attention", q, k_cache, v_cache)
    out = _partitioned_forward(q, k_cache, v_cache, lengths, windows, softmax_scale, interpret, config)
    return out, (q, k_cache, v_cache, lengths)


def _decode_bwd(windows, softmax_scale, interpret, config, xla_backward, res, d_out):
    if not xla_backward:
        raise NotImplementedError(
            "decode_attention has no Pallas backward kernel; differentiate it with implementation='xla' or 'auto'"
        )
    q, k_cache, v_cache, lengths = res
    _, vjp = jax.vjp(lambda *a: _xla_decode(*a, lengths, windows, softmax_scale), q, k_cache, v_cache)
    return (*vjp(d_out), np.zeros(lengths.shape, jax.dtypes.float0))


_decode.defvjp(_decode_fwd, _decode_bwd)


__all__ = ["DecodeConfig", "decode_attention", "default_config"]
