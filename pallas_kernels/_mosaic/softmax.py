"""Softmax attention (FlashAttention-3 scheme) as Pallas kernels for the Mosaic GPU lowering (Hopper and newer).

Same contract as ``_triton/softmax.py`` for the window family (causal or full, one window per query head, GQA,
segment ids for packing and padding; no soft-cap or sinks):
``forward`` returns the output and the base-2 log-sum-exp ``[batch, heads, q_len]`` (``+inf`` on rows that see no
key), ``backward`` returns dQ, dK, dV from the residuals ``(q, k, v, out, lse)``. Either backend's backward accepts
the other's forward residuals.

Each program runs three warpgroups: two consumers own consecutive query tiles (forward, dQ) or key tiles (dK/dV) and
issue the ``wgmma`` matrix products; one producer streams the tiles they loop over with TMA copies into a ring of
``stages`` shared-memory slots (``k_ready``/``k_free`` barriers per slot). The producer streams the union of the two
consumers' block ranges; a consumer waits on and releases the slots outside its own range without computing, so
every barrier sees the same number of arrivals and waits. Inside its range a consumer runs the blocks that need an
element mask (window edges, the diagonal, ragged tails) apart from the entirely visible ones, as the Triton kernels
do, so cost follows the mask: O(S * W) for a window in the forward and both backward kernels. Segment ids cut
each consumer's range further (``segment_block_ranges``) and join the element mask of its partial blocks.

Sequence lengths that are not multiples of the tiles are padded here (keys past ``kv_len`` are masked; padded query
rows are dropped); aligned shapes are not copied.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from pallas_kernels._vma import out_struct
from pallas_kernels.block_ranges import BlockRange, Geometry, kv_block_range, q_block_range, segment_block_ranges
from pallas_kernels.masks import PAD_KEY, PAD_QUERY, UNLIMITED_WINDOW, Segments, WindowMask

try:  # Mosaic GPU's Pallas API moves between releases; ``SUPPORTED_JAX`` lists the versions this file is tested on.
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover - depends on the installed JAX
    plgpu = None

# JAX releases on which these kernels were compiled and checked on a GPU (tests marked ``gpu``).
SUPPORTED_JAX = ("0.11.2",)
DTYPES = (jnp.bfloat16, jnp.float16)
HEAD_DIMS = (64, 128, 256)


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """Tiles of the Mosaic kernels: each of the two consumer warpgroups owns ``block_q`` query rows (forward, dQ) or
    ``block_kv_bwd`` key rows (dK/dV); ``stages`` tiles are in flight in shared memory; the dQ kernel streams key
    tiles of ``block_kv_dq`` rows."""

    block_q: int = 64
    block_kv: int = 128
    stages: int = 2
    block_q_bwd: int = 64
    block_kv_bwd: int = 64
    stages_bwd: int = 2
    block_kv_dq: int = 128

    def __post_init__(self):
        for name in ("block_q", "block_kv", "block_q_bwd", "block_kv_bwd", "block_kv_dq"):
            if getattr(self, name) % 64:
                raise ValueError(f"{name}={getattr(self, name)} must be a multiple of 64 (one wgmma M tile)")
        for name in ("stages", "stages_bwd"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 2")


def default_config(head_dim: int, windows: tuple[int | None, ...] = (None,)) -> MosaicConfig:
    """d<=128: 64x128 forward tiles (two query tiles per program); d256: 64-key tiles so K/V stages fit in 227 KiB.

    The dQ kernel streams 128-key tiles, or 64-key tiles when every head has a window: a band's two edge tiles are
    then a smaller share of its work (W=1024 on the H200: forward+backward 9-14% faster with 64, BENCHMARKS.md,
    tenth session; on full and causal attention 128 was as fast at d128 and 1.5-3% faster at d64)."""
    block_kv_dq = 64 if all(w is not None for w in windows) else 128
    if head_dim > 128:
        return MosaicConfig(block_kv=64, block_kv_bwd=64, block_kv_dq=block_kv_dq)
    return MosaicConfig(block_kv_dq=block_kv_dq)


def unsupported_reason(q: Array, k: Array, mask: Any, backward: bool = False) -> str | None:
    """Why the Mosaic kernels cannot run this call (``None``: they can); ``backward`` asks about the backward pass.

    On a Hopper GPU whose JAX is not in ``SUPPORTED_JAX`` this warns once: ``"auto"``/``"pallas"`` then use Triton.
    """
    if not isinstance(mask, WindowMask):
        return "the Mosaic GPU kernels serve causal, full, window and multi-scale masks, not block-sparse ones"
    if q.dtype not in map(jnp.dtype, DTYPES):
        return f"the Mosaic GPU kernels take bfloat16 or float16 inputs, not {q.dtype}"
    if q.shape[-1] not in HEAD_DIMS:
        return f"the Mosaic GPU kernels take head_dim in {HEAD_DIMS}, not {q.shape[-1]}"
    if backward and q.shape[-1] > 128:
        return "the Mosaic GPU backward takes head_dim <= 128 (its tiles at 256 exceed shared memory)"
    device = jax.devices()[0]
    if device.platform != "gpu" or float(getattr(device, "compute_capability", 0) or 0) < 9.0:
        return f"the Mosaic GPU kernels need an NVIDIA GPU of compute capability >= 9.0, not {device.device_kind}"
    if plgpu is None or jax.__version__ not in SUPPORTED_JAX:
        _warn_untested_jax()
        return f"the Mosaic GPU kernels are tested on JAX {', '.join(SUPPORTED_JAX)}, not {jax.__version__}"
    return None


@functools.cache
def _warn_untested_jax() -> None:
    warnings.warn(
        f"complexity-jax: the Mosaic GPU kernels are tested on JAX {', '.join(SUPPORTED_JAX)} and this is JAX"
        f" {jax.__version__} (Mosaic GPU's API changes between releases); softmax attention runs the Triton kernels",
        RuntimeWarning,
        stacklevel=4,
    )


def _head_window(windows: tuple[int | None, ...], head) -> Any:
    """The window of query head ``head`` (traced) as an int32 scalar: a select per run of equal windows."""
    values = [UNLIMITED_WINDOW if w is None else min(w, UNLIMITED_WINDOW) for w in windows]
    runs, start = [], 0
    for h in range(1, len(values) + 1):
        if h == len(values) or values[h] != values[start]:
            runs.append((start, h, values[start]))
            start = h
    window = jnp.int32(runs[-1][2])
    for start, stop, value in runs[:-1]:
        window = jnp.where((head >= start) & (head < stop), jnp.int32(value), window)
    return window


def _visible(q_pos, k_pos, window, causal: bool, kv_len: int):
    """Element mask ``[rows, cols]`` from broadcastable positions (as ``masks.WindowMask``, keys past ``kv_len``
    excluded)."""
    d = q_pos - k_pos
    seen = (d >= 0) & (d < window) if causal else (d < window) & (d > -window)
    return seen & (k_pos < kv_len)


def _pad_to(x: Array, axis: int, multiple: int) -> Array:
    pad = -x.shape[axis] % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _smem_transforms():
    return (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


class _Ring(NamedTuple):
    """A ring of shared-memory slots filled by the producer: ``ready[slot]`` completes when the TMA copy lands,
    ``free[slot]`` when both consumers have released it."""

    ready: Any
    free: Any

    def wait(self, slot):
        plgpu.barrier_wait(self.ready.at[slot])

    def release(self, slot):
        plgpu.barrier_arrive(self.free.at[slot])


def _key_blocks(first_row, window, st: Geometry, block_q: int, block_kv: int) -> BlockRange:
    """Key blocks seen by query rows ``[first_row, first_row + block_q)`` (rows past ``q_len`` are padding)."""
    last_row = jnp.minimum(first_row + block_q, st.q_len) - 1
    return kv_block_range(first_row + st.offset, last_row + st.offset, window, st, block_kv)


def _union(a: BlockRange, b: BlockRange):
    """Steps ``[start, stop)`` that the producer streams for two consumers' block ranges."""
    start = jnp.minimum(a.lo, b.lo)
    return start, jnp.maximum(jnp.maximum(a.hi, b.hi), start)


def _run_range(blocks: BlockRange, start, stop, compute, skip, carry):
    """A consumer's pass over the producer's steps ``[start, stop)``: ``skip`` outside its own ``blocks``, ``compute``
    with the element mask on its partial blocks and without it on the entirely visible ones."""
    carry = lax.fori_loop(start, blocks.lo, skip, carry)
    carry = lax.fori_loop(blocks.lo, blocks.full_lo, functools.partial(compute, masked=True), carry)
    carry = lax.fori_loop(blocks.full_lo, blocks.full_hi, functools.partial(compute, masked=False), carry)
    carry = lax.fori_loop(blocks.full_hi, blocks.hi, functools.partial(compute, masked=True), carry)
    return lax.fori_loop(blocks.hi, stop, skip, carry)


def _produce(base, start, stop, stages: int, copies) -> None:
    """Producer loop over steps ``[start, stop)``, the ``base``-th step onwards of the kernel's stream: stream step
    ``c`` reuses slot ``c % stages`` once both consumers released stream step ``c - stages``.

    ``copies(step, slot)`` yields ``(src_ref, dst_ref, ring)`` for each tile of ``step``.
    """

    @pl.loop(start, stop)
    def _(step):
        c = base + step - start
        slot = lax.rem(c, stages)
        for src, dst, ring in copies(step, slot):

            @pl.when(c >= stages)
            def _():
                plgpu.barrier_wait(ring.free.at[slot])

            plgpu.copy_gmem_to_smem(src, dst, ring.ready.at[slot])


def _rings(count: int, stages: int) -> tuple[_Ring, ...]:
    return tuple(
        _Ring(plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_arrivals=2, num_barriers=stages))
        for _ in range(count)
    )


def _zeros(shape) -> Array:
    return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)


def _rows_of(x: Array, axis: int, shape) -> Array:
    """Broadcasts a per-row (``axis=0``) or per-column (``axis=1``) vector over a ``shape`` tile."""
    return lax.broadcast_in_dim(x, shape, [axis])


def _kernel_call(body, *, inputs, out_type, scratch, grid, grid_names):
    """A three-warpgroup Mosaic GPU kernel: ``body(*in_refs, *out_refs, scratch)``, scratch allocated per program."""

    def entry(*refs):
        pl.run_scoped(lambda *scratch_refs: body(*refs, scratch_refs), *scratch, collective_axes="wg")

    return plgpu.kernel(
        entry,
        out_type=out_type,
        grid=grid,
        grid_names=grid_names,
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(*inputs)


class _SegmentRefs(NamedTuple):
    """Segment ids inside a kernel (global memory): ``q_ids [batch, q_len_padded]``, ``kv_ids [batch,
    kv_len_padded]`` and ``ranges [batch, tiles, 4]``, the ``segment_block_ranges`` of the program axis's tiles."""

    q_ids: Any
    kv_ids: Any
    ranges: Any

    def restrict(self, blocks: BlockRange, batch, tile) -> BlockRange:
        """``blocks`` of program tile ``tile`` cut to the blocks its segments can see."""
        return blocks.intersect(BlockRange(*(self.ranges[batch, tile, c] for c in range(4))))

    def same(self, batch, q_first, k_first, shape, keys_first: bool = False):
        """Element mask of a ``shape`` tile (``[queries, keys]``, or ``[keys, queries]`` if ``keys_first``) whose first
        query and key are ``q_first``/``k_first``: query and key in the same segment."""
        q_axis = 1 if keys_first else 0
        ids = [plgpu.load(ref.at[batch, pl.ds(first, shape[axis])], layout=plgpu.Layout.WGMMA.reduce(1 - axis),
                          optimized=False)
               for ref, first, axis in ((self.q_ids, q_first, q_axis), (self.kv_ids, k_first, 1 - q_axis))]
        return _rows_of(ids[0], q_axis, shape) == _rows_of(ids[1], 1 - q_axis, shape)


def _split_segment_refs(refs, segmented: bool) -> tuple[_SegmentRefs | None, tuple]:
    """A kernel's refs after q, k, v (and the backward's residuals): its ``_SegmentRefs`` if ``segmented``, then
    the rest (outputs, scratch)."""
    return (_SegmentRefs(*refs[:3]), refs[3:]) if segmented else (None, refs)


def _segment_inputs(segments: Segments | None, q_len_padded: int, kv_len_padded: int, block_q: int, block_k: int,
                    *, by_key: bool) -> tuple[Array, ...]:
    """The arrays of ``_SegmentRefs`` for tiles ``block_q`` x ``block_k`` (empty without segments): ids padded with
    ids that match nothing, ranges of the padded tiles empty."""
    if segments is None:
        return ()
    q_ids = jnp.pad(segments.q, ((0, 0), (0, q_len_padded - segments.q.shape[1])), constant_values=PAD_QUERY)
    kv_ids = jnp.pad(segments.kv, ((0, 0), (0, kv_len_padded - segments.kv.shape[1])), constant_values=PAD_KEY)
    ranges = segment_block_ranges(segments.q, segments.kv, block_q, block_k, by_key=by_key)
    tiles = (kv_len_padded // block_k) if by_key else (q_len_padded // block_q)
    return q_ids, kv_ids, jnp.pad(ranges, ((0, 0), (0, tiles - ranges.shape[1]), (0, 0)))


def _stream_kv(k_ref, v_ref, k_smem, v_smem, k_ring, v_ring, batch, kv_head, start, stop, block_kv, stages):
    """Producer of the forward and dQ kernels: key/value tiles ``[start, stop)`` of one KV head."""

    def copies(step, slot):
        keys = (batch, pl.ds(step * block_kv, block_kv), kv_head)
        return (k_ref.at[keys], k_smem.at[slot], k_ring), (v_ref.at[keys], v_smem.at[slot], v_ring)

    _produce(0, start, stop, stages, copies)


# --------------------------------------------------------------------------------------------------------------
# Forward: two consumers of block_q query rows each, ping-ponging their softmax with each other's matrix products.


def _forward_kernel(q_ref, k_ref, v_ref, *refs, st: Geometry, windows, group: int, num_q_programs: int,
                    config: MosaicConfig, segmented: bool):
    segs, (out_ref, lse_ref, scratch) = _split_segment_refs(refs, segmented)
    (qo_smem2, k_smem, v_smem, lse_smem2), (k_ring, v_ring), q_ready, schedule = scratch
    bq, bk, stages = config.block_q, config.block_kv, config.stages
    batch, head, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
    # Longest (causal: last) query tiles first, so the short ones fill the tail of the launch.
    program_q = num_q_programs - 1 - lax.axis_index("q_seq")
    window = _head_window(windows, head)

    def key_blocks(w):
        blocks = _key_blocks(program_q * (2 * bq) + w * bq, window, st, bq, bk)
        return blocks if segs is None else segs.restrict(blocks, batch, program_q * 2 + w)

    start, stop = _union(key_blocks(0), key_blocks(1))

    def schedule_barrier():
        plgpu.barrier_arrive(schedule)
        plgpu.barrier_wait(schedule)

    @pl.when(wg < 2)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        qo_smem, lse_smem = qo_smem2.at[wg], lse_smem2.at[wg]
        r0 = program_q * (2 * bq) + wg * bq
        rows = (batch, pl.ds(r0, bq), head)
        plgpu.copy_gmem_to_smem(q_ref.at[rows], qo_smem, q_ready.at[wg])
        plgpu.barrier_wait(q_ready.at[wg])
        q_pos = plgpu.broadcasted_iota(jnp.int32, (bq, bk), 0, layout=plgpu.Layout.WGMMA) + (r0 + st.offset)
        k_iota = plgpu.broadcasted_iota(jnp.int32, (bq, bk), 1, layout=plgpu.Layout.WGMMA)

        def wait_next(step):
            # Issued while the P @ V product of ``step`` is in flight, as in JAX's attention_mgpu.py.
            @pl.when(step + 1 < stop)
            def _():
                k_ring.wait(lax.rem(step + 1 - start, stages))

        def compute(step, carry, masked: bool):
            acc, m_i, l_i = carry
            slot = lax.rem(step - start, stages)

            def qk_product(acc_ref):
                plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
                schedule_barrier()
                return acc_ref[...]

            s = pl.run_scoped(qk_product, plgpu.ACC((bq, bk), jnp.float32))
            k_ring.release(slot)
            if masked:
                seen = _visible(q_pos, k_iota + step * bk, window, st.causal, st.kv_len)
                if segs is not None:
                    seen &= segs.same(batch, r0, step * bk, s.shape)
                s = jnp.where(seen, s, -jnp.inf)
            # Scores stay unscaled until exp2: one multiply-add per element (st.qk_scale > 0, see ``forward``).
            m_new = jnp.maximum(m_i, s.max(axis=1) * st.qk_scale)
            m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
            alpha = jnp.exp2(m_i - m_use)
            p = jnp.exp2(s * st.qk_scale - _rows_of(m_use, 0, s.shape))
            acc *= _rows_of(alpha, 0, acc.shape)
            l_i = l_i * alpha + p.sum(axis=1)
            p16 = p.astype(qo_smem.dtype)
            acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
            plgpu.barrier_arrive(schedule)
            v_ring.wait(slot)
            plgpu.barrier_wait(schedule)

            def pv_product(acc_ref):
                plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                wait_next(step)

            acc = pl.run_state(pv_product)(plgpu.ACC.init(acc))
            v_ring.release(slot)
            return acc, m_new, l_i

        def skip(step, carry):
            slot = lax.rem(step - start, stages)
            k_ring.release(slot)
            v_ring.wait(slot)
            v_ring.release(slot)
            schedule_barrier()
            schedule_barrier()
            wait_next(step)
            return carry

        carry = (
            _zeros((bq, st.head_dim)),
            plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
            plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
        )

        @pl.when(stop > start)
        def _():
            k_ring.wait(0)

        pl.when(wg == 1)(schedule_barrier)
        acc, m_i, l_i = _run_range(key_blocks(wg), start, stop, compute, skip, carry)
        pl.when(wg == 0)(schedule_barrier)

        empty = l_i == 0.0
        acc /= _rows_of(jnp.where(empty, 1.0, l_i), 0, acc.shape)
        qo_smem[...] = acc.astype(qo_smem.dtype)
        # +inf makes the backward's exp2(s - lse) vanish on rows that saw no key.
        lse_smem[...] = jnp.where(empty, jnp.inf, m_i + jnp.log2(jnp.where(empty, 1.0, l_i)))
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[rows])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[batch, head, pl.ds(r0, bq)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")
        _stream_kv(k_ref, v_ref, k_smem, v_smem, k_ring, v_ring, batch, lax.div(head, group), start, stop, bk, stages)


def _forward_call(q, k, v, segments: Segments | None, st: Geometry, windows, config: MosaicConfig):
    batch, q_len_padded, heads, head_dim = q.shape
    bq, bk, stages = config.block_q, config.block_kv, config.stages
    num_q_programs = q_len_padded // (2 * bq)
    transforms = _smem_transforms()
    body = functools.partial(_forward_kernel, st=st, windows=windows, group=heads // k.shape[2],
                             num_q_programs=num_q_programs, config=config, segmented=segments is not None)
    return _kernel_call(
        body,
        inputs=(q, k, v, *_segment_inputs(segments, q_len_padded, k.shape[1], bq, bk, by_key=False)),
        out_type=(out_struct(q.shape, q.dtype, q),
                  out_struct((batch, heads, q_len_padded), jnp.float32, q)),
        scratch=(
            (
                plgpu.SMEM((2, bq, head_dim), q.dtype, transforms=transforms),
                plgpu.SMEM((stages, bk, head_dim), q.dtype, transforms=transforms),
                plgpu.SMEM((stages, bk, head_dim), q.dtype, transforms=transforms),
                plgpu.SMEM((2, bq), jnp.float32),
            ),
            _rings(2, stages),
            plgpu.Barrier(num_barriers=2),
            plgpu.Barrier(num_arrivals=2),
        ),
        grid=(heads, num_q_programs, batch),
        grid_names=("heads", "q_seq", "batch"),
    )


# --------------------------------------------------------------------------------------------------------------
# Backward: dQ (two consumers of block_q_bwd query rows, keys streamed) and dK/dV (two consumers of block_kv_bwd
# key rows, summed over the query heads of their KV head; queries streamed). delta = rowsum(dO * O) comes from XLA.


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, st: Geometry, windows, group: int,
               config: MosaicConfig, segmented: bool):
    segs, (dq_ref, scratch) = _split_segment_refs(refs, segmented)
    (q_smem2, do_smem2, lse_smem2, delta_smem2, k_smem, v_smem), (k_ring, v_ring), row_ready = scratch
    bq, bk, stages = config.block_q_bwd, config.block_kv_dq, config.stages_bwd
    batch, head, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
    program_q = lax.axis_index("q_seq")
    window = _head_window(windows, head)

    def key_blocks(w):
        blocks = _key_blocks(program_q * (2 * bq) + w * bq, window, st, bq, bk)
        return blocks if segs is None else segs.restrict(blocks, batch, program_q * 2 + w)

    start, stop = _union(key_blocks(0), key_blocks(1))

    @pl.when(wg < 2)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
        r0 = program_q * (2 * bq) + wg * bq
        rows = (batch, pl.ds(r0, bq), head)
        row_vectors = (batch, head, pl.ds(r0, bq))
        loads = ((q_ref.at[rows], q_smem), (do_ref.at[rows], do_smem),
                 (lse_ref.at[row_vectors], lse_smem2.at[wg]), (delta_ref.at[row_vectors], delta_smem2.at[wg]))
        for (src, dst), ready in zip(loads, row_ready):
            plgpu.copy_gmem_to_smem(src, dst, ready.at[wg])
        for ready in row_ready:
            plgpu.barrier_wait(ready.at[wg])
        lse = plgpu.load(lse_smem2.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
        delta = plgpu.load(delta_smem2.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
        q_pos = plgpu.broadcasted_iota(jnp.int32, (bq, bk), 0, layout=plgpu.Layout.WGMMA) + (r0 + st.offset)
        k_iota = plgpu.broadcasted_iota(jnp.int32, (bq, bk), 1, layout=plgpu.Layout.WGMMA)

        def compute(step, dq, masked: bool):
            slot = lax.rem(step - start, stages)
            k_ring.wait(slot)
            v_ring.wait(slot)

            def products(refs):
                s_ref, dp_ref = refs
                plgpu.wgmma(s_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
                plgpu.wgmma(dp_ref, do_smem, v_smem.at[slot].transpose((1, 0)))

            s, dp = pl.run_state(products)((plgpu.ACC.init(_zeros((bq, bk))), plgpu.ACC.init(_zeros((bq, bk)))))
            v_ring.release(slot)
            if masked:
                seen = _visible(q_pos, k_iota + step * bk, window, st.causal, st.kv_len)
                if segs is not None:
                    seen &= segs.same(batch, r0, step * bk, s.shape)
                s = jnp.where(seen, s, -jnp.inf)
            p = jnp.exp2(s * st.qk_scale - _rows_of(lse, 0, s.shape))
            ds = p * (dp - _rows_of(delta, 0, s.shape))

            def dq_product(acc_ref):
                plgpu.wgmma(acc_ref, ds.astype(q_smem.dtype), k_smem.at[slot])

            dq = pl.run_state(dq_product)(plgpu.ACC.init(dq))
            k_ring.release(slot)
            return dq

        def skip(step, dq):
            slot = lax.rem(step - start, stages)
            for ring in (k_ring, v_ring):
                ring.wait(slot)
                ring.release(slot)
            return dq

        dq = _run_range(key_blocks(wg), start, stop, compute, skip, _zeros((bq, st.head_dim)))
        q_smem[...] = (dq * st.softmax_scale).astype(q_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[rows])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")
        _stream_kv(k_ref, v_ref, k_smem, v_smem, k_ring, v_ring, batch, lax.div(head, group), start, stop, bk, stages)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, st: Geometry, windows, group: int,
                config: MosaicConfig, segmented: bool):
    segs, (dk_ref, dv_ref, scratch) = _split_segment_refs(refs, segmented)
    (k_smem2, v_smem2, q_smem, do_smem, lse_smem, delta_smem), rings, key_ready = scratch
    q_ring, do_ring, lse_ring, delta_ring = rings
    bq, bk, stages = config.block_q_bwd, config.block_kv_bwd, config.stages_bwd
    batch, kv_head, wg = lax.axis_index("batch"), lax.axis_index("kv_heads"), lax.axis_index("wg")
    program_k = lax.axis_index("kv_seq")

    def query_blocks(w, window):
        j0 = program_k * (2 * bk) + w * bk
        blocks = q_block_range(j0, jnp.minimum(j0 + bk, st.kv_len) - 1, window, st, bq)
        return blocks if segs is None else segs.restrict(blocks, batch, program_k * 2 + w)

    def head_steps(g):
        """Query head ``g`` of the group: its index, window and the query blocks streamed for it."""
        head = kv_head * group + g
        window = _head_window(windows, head)
        return head, window, *_union(query_blocks(0, window), query_blocks(1, window))

    @pl.when(wg < 2)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
        j0 = program_k * (2 * bk) + wg * bk
        keys = (batch, pl.ds(j0, bk), kv_head)
        for (src, dst), ready in zip(((k_ref.at[keys], k_smem), (v_ref.at[keys], v_smem)), key_ready):
            plgpu.copy_gmem_to_smem(src, dst, ready.at[wg])
        for ready in key_ready:
            plgpu.barrier_wait(ready.at[wg])
        k_pos = plgpu.broadcasted_iota(jnp.int32, (bk, bq), 0, layout=plgpu.Layout.WGMMA) + j0
        q_iota = plgpu.broadcasted_iota(jnp.int32, (bk, bq), 1, layout=plgpu.Layout.WGMMA) + st.offset

        def head_step(g, carry):
            dk, dv, base = carry
            _, window, start, stop = head_steps(g)

            def compute(step, grads, masked: bool):
                dk, dv = grads
                slot = lax.rem(base + step - start, stages)
                for ring in rings:
                    ring.wait(slot)

                def products(refs):
                    s_ref, dp_ref = refs
                    plgpu.wgmma(s_ref, k_smem, q_smem.at[slot].transpose((1, 0)))
                    plgpu.wgmma(dp_ref, v_smem, do_smem.at[slot].transpose((1, 0)))

                s_t, dp_t = pl.run_state(products)(
                    (plgpu.ACC.init(_zeros((bk, bq))), plgpu.ACC.init(_zeros((bk, bq))))
                )
                lse = plgpu.load(lse_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
                delta = plgpu.load(delta_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
                lse_ring.release(slot)
                delta_ring.release(slot)
                if masked:
                    seen = _visible(q_iota + step * bq, k_pos, window, st.causal, st.kv_len)
                    if segs is not None:
                        seen &= segs.same(batch, step * bq, j0, s_t.shape, keys_first=True)
                    s_t = jnp.where(seen, s_t, -jnp.inf)
                p_t = jnp.exp2(s_t * st.qk_scale - _rows_of(lse, 1, s_t.shape))
                ds_t = p_t * (dp_t - _rows_of(delta, 1, s_t.shape))

                def grad_products(refs):
                    dv_ref, dk_ref = refs
                    plgpu.wgmma(dv_ref, p_t.astype(q_smem.dtype), do_smem.at[slot])
                    plgpu.wgmma(dk_ref, ds_t.astype(q_smem.dtype), q_smem.at[slot])

                dv, dk = pl.run_state(grad_products)((plgpu.ACC.init(dv), plgpu.ACC.init(dk)))
                q_ring.release(slot)
                do_ring.release(slot)
                return dk, dv

            def skip(step, grads):
                slot = lax.rem(base + step - start, stages)
                for ring in rings:
                    ring.wait(slot)
                    ring.release(slot)
                return grads

            dk, dv = _run_range(query_blocks(wg, window), start, stop, compute, skip, (dk, dv))
            return dk, dv, base + (stop - start)

        zeros = _zeros((bk, st.head_dim))
        dk, dv, _ = lax.fori_loop(0, group, head_step, (zeros, zeros, jnp.int32(0)))
        k_smem[...] = (dk * st.softmax_scale).astype(k_smem.dtype)
        v_smem[...] = dv.astype(v_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[keys])
        plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[keys])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")

        def head_step(g, base):
            head, _, start, stop = head_steps(g)

            def copies(step, slot):
                rows, row_vectors = (batch, pl.ds(step * bq, bq), head), (batch, head, pl.ds(step * bq, bq))
                return (
                    (q_ref.at[rows], q_smem.at[slot], q_ring),
                    (do_ref.at[rows], do_smem.at[slot], do_ring),
                    (lse_ref.at[row_vectors], lse_smem.at[slot], lse_ring),
                    (delta_ref.at[row_vectors], delta_smem.at[slot], delta_ring),
                )

            _produce(base, start, stop, stages, copies)
            return base + (stop - start)

        lax.fori_loop(0, group, head_step, jnp.int32(0))


def _backward_calls(q, k, v, do, lse, delta, segments: Segments | None, st: Geometry, windows, config: MosaicConfig):
    batch, q_len_padded, heads, head_dim = q.shape
    kv_len_padded, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    bq, bk, stages = config.block_q_bwd, config.block_kv_bwd, config.stages_bwd
    transforms = _smem_transforms()
    tile = lambda *shape: plgpu.SMEM(shape, q.dtype, transforms=transforms)
    vector = lambda *shape: plgpu.SMEM(shape, jnp.float32)
    common = dict(st=st, windows=windows, group=group, config=config, segmented=segments is not None)
    dq = _kernel_call(
        functools.partial(_dq_kernel, **common),
        inputs=(q, k, v, do, lse, delta,
                *_segment_inputs(segments, q_len_padded, kv_len_padded, bq, config.block_kv_dq, by_key=False)),
        out_type=out_struct(q.shape, q.dtype, q),
        scratch=(
            (tile(2, bq, head_dim), tile(2, bq, head_dim), vector(2, bq), vector(2, bq),
             tile(stages, config.block_kv_dq, head_dim), tile(stages, config.block_kv_dq, head_dim)),
            _rings(2, stages),
            tuple(plgpu.Barrier(num_barriers=2) for _ in range(4)),
        ),
        grid=(heads, q_len_padded // (2 * bq), batch),
        grid_names=("heads", "q_seq", "batch"),
    )
    dk, dv = _kernel_call(
        functools.partial(_dkv_kernel, **common),
        inputs=(q, k, v, do, lse, delta, *_segment_inputs(segments, q_len_padded, kv_len_padded, bq, bk, by_key=True)),
        out_type=(out_struct(k.shape, k.dtype, q), out_struct(v.shape, v.dtype, q)),
        scratch=(
            (tile(2, bk, head_dim), tile(2, bk, head_dim), tile(stages, bq, head_dim), tile(stages, bq, head_dim),
             vector(stages, bq), vector(stages, bq)),
            _rings(4, stages),
            tuple(plgpu.Barrier(num_barriers=2) for _ in range(2)),
        ),
        grid=(kv_heads, kv_len_padded // (2 * bk), batch),
        grid_names=("kv_heads", "kv_seq", "batch"),
    )
    return dq, dk, dv


# --------------------------------------------------------------------------------------------------------------
# Entry points (the backend seam's contract).


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def forward(
    q: Float[Array, "batch q_len heads head_dim"],
    k: Float[Array, "batch kv_len kv_heads head_dim"],
    v: Float[Array, "batch kv_len kv_heads head_dim"],
    mask: WindowMask,
    softmax_scale: float,
    config: MosaicConfig,
    segments: Segments | None = None,
) -> tuple[Float[Array, "batch q_len heads head_dim"], Float[Array, "batch heads q_len"]]:
    """Output and base-2 log-sum-exp ``[batch, heads, q_len]``; ``softmax_scale`` must be positive. ``segments``
    (packing, padding): a query sees only keys of its own segment id, besides ``mask``."""
    q_len, kv_len = q.shape[1], k.shape[1]
    st = Geometry(q_len, kv_len, q.shape[3], mask.causal, softmax_scale)
    qp = _pad_to(q, 1, 2 * config.block_q)
    kp, vp = (_pad_to(x, 1, config.block_kv) for x in (k, v))
    out, lse = _forward_call(qp, kp, vp, segments, st, tuple(mask.windows), config)
    return out[:, :q_len], lse[:, :, :q_len]


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def backward(
    mask: WindowMask,
    softmax_scale: float,
    config: MosaicConfig,
    res: tuple[Array, Array, Array, Array, Array],
    do: Float[Array, "batch q_len heads head_dim"],
    segments: Segments | None = None,
) -> tuple[Array, Array, Array]:
    """dQ, dK, dV from the residuals ``(q, k, v, out, lse)`` of either backend's forward (same ``segments``)."""
    q, k, v, out, lse = res
    q_len, kv_len = q.shape[1], k.shape[1]
    st = Geometry(q_len, kv_len, q.shape[3], mask.causal, softmax_scale)
    delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), do.astype(jnp.float32))
    q_multiple = 2 * max(config.block_q_bwd, config.block_kv_bwd)
    qp, dop = (_pad_to(x, 1, q_multiple) for x in (q, do.astype(q.dtype)))
    kp, vp = (_pad_to(x, 1, math.lcm(2 * config.block_kv_bwd, config.block_kv_dq)) for x in (k, v))
    # Padded rows: lse = +inf makes their probabilities, hence their contributions, exactly zero.
    lse_p = jnp.pad(lse, ((0, 0), (0, 0), (0, qp.shape[1] - q_len)), constant_values=jnp.inf)
    delta_p = _pad_to(delta, 2, q_multiple)
    dq, dk, dv = _backward_calls(qp, kp, vp, dop, lse_p, delta_p, segments, st, tuple(mask.windows), config)
    return dq[:, :q_len], dk[:, :kv_len], dv[:, :kv_len]


__all__ = [
    "DTYPES", "HEAD_DIMS", "MosaicConfig", "SUPPORTED_JAX", "backward", "default_config", "forward",
    "unsupported_reason",
]
