"""Linear attention (Katharopoulos et al. 2020) as Pallas GPU kernels for the Triton lowering.

With ``a_i = phi(q_i)``, ``b_j = phi(k_j)`` and an initial state ``(S0, z0)``::

    out_i = a_i @ S_i / (a_i . z_i + 1e-6),   S_i = S0 + sum_j b_j v_j^T,   z_i = z0 + sum_j b_j

where the sums run over ``j <= i`` (causal) or over the whole sequence (non-causal). Query head ``h`` reads
KV head ``h // group``. The final state ``(S0 + sum_all b_j v_j^T, z0 + sum_all b_j)`` is returned per KV head.

The forward walks the state through the sequence (causal: storing the state before every chunk, ``[chunks, d, d]``
per KV head in the input dtype, as large as ``k`` when the chunk equals head_dim) and then computes the output of all
chunks in parallel. The backward walks the
state's cotangent in reverse, storing it per chunk too, and computes dq, dk, dv of all chunks in parallel. Dots
take operands in the input dtype (bf16 on the half-precision tensor cores, fp32 exact; fp16 inputs run as fp32, see
``_compute_dtype``) and accumulate in fp32; feature maps, sums, normalisers and the carried states stay fp32.
Residuals, all O(seq): the inputs, the output, the per-query normaliser and the per-chunk states (non-causal: the
final state).
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from pallas_kernels import _partitioning
from pallas_kernels._autodiff import reject_higher_order
from pallas_kernels._vma import out_struct
from pallas_kernels.block_ranges import int_div
from pallas_kernels.reference import LinearState

from .compiler import compiler_params, pl, plgpu

FeatureMap = Literal["elu", "relu", "softmax"]
QArray = Float[Array, "batch seq heads head_dim"]
KVArray = Float[Array, "batch seq kv_heads head_dim"]
StateKV = Float[Array, "batch kv_heads head_dim head_dim"]
StateSum = Float[Array, "batch kv_heads head_dim"]

_EPS = 1e-6
_FEATURE_MAPS = get_args(FeatureMap)
_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
# 64 value columns per program of the state walks: (batch, kv_heads, 2) programs at head_dim 128. Tests lower it to
# cover several tiles.
_TILE = 64


class _Config(NamedTuple):
    feature_map: str
    causal: bool
    chunk: int  # sequence rows of a walk step and of a chunk-parallel program
    interpret: bool
    tile: int  # value-column tile of the state walks' third grid axis (capped at head_dim)


# ----------------------------------------------------------------------------------------------------------------
# In-kernel helpers. Feature maps, sums and the state work on fp32 tiles; dots take input-dtype operands.


def _phi(x: jax.Array, feature_map: str) -> jax.Array:
    if feature_map == "elu":
        return jnp.where(x > 0, x + 1.0, jnp.exp(jnp.minimum(x, 0.0)))
    if feature_map == "relu":
        return jnp.maximum(x, 0.0)
    e = jnp.exp(x - jnp.max(x, axis=1)[:, None])
    return e / jnp.sum(e, axis=1)[:, None]


def _phi_vjp(x: jax.Array, dphi: jax.Array, feature_map: str) -> jax.Array:
    """Cotangent of ``x`` given the cotangent ``dphi`` of ``_phi(x)``."""
    if feature_map == "elu":
        return dphi * jnp.where(x > 0, 1.0, jnp.exp(jnp.minimum(x, 0.0)))
    if feature_map == "relu":
        return jnp.where(x > 0, dphi, 0.0)
    p = _phi(x, feature_map)
    return p * (dphi - jnp.sum(dphi * p, axis=1)[:, None])


def _dot(x: jax.Array, y: jax.Array, dtype, **kwargs) -> jax.Array:
    """fp32 ``x @ y`` (``plgpu.dot`` transposes) with both operands cast to the input ``dtype``: half inputs
    multiply on the half-precision tensor cores with fp32 accumulation, fp32 inputs exactly."""
    precision = lax.Precision.HIGHEST if dtype == jnp.float32 else lax.Precision.DEFAULT
    return plgpu.dot(x.astype(dtype), y.astype(dtype), precision=precision, **kwargs)


def _row_mask(valid: jax.Array, width: int) -> jax.Array:
    return jnp.broadcast_to(valid[:, None], (valid.shape[0], width))


def _load(ref, mask: jax.Array, other: float = 0.0) -> jax.Array:
    """A masked tile in the ref's dtype."""
    return plgpu.load(ref, mask=mask, other=other)


def _load32(ref, mask: jax.Array, other: float = 0.0) -> jax.Array:
    return _load(ref, mask, other).astype(jnp.float32)


def _keys(k_ref, mask: jax.Array, feature_map: str) -> tuple[jax.Array, jax.Array]:
    """Loads a key tile; returns it (fp32) and phi of it with rows past the sequence zeroed."""
    y = _load32(k_ref, mask)
    # phi(0) != 0 for elu and softmax: padded keys must be zeroed after the feature map.
    return y, jnp.where(mask, _phi(y, feature_map), 0.0)


# ----------------------------------------------------------------------------------------------------------------
# Forward and backward (causal and non-causal alike): two sequential state walks and three chunk-parallel kernels.
#   _state_kernel (forward walk):       S_c, z_c = the state before chunk c, and the final state;
#   _state_grad_kernel (reverse walk):  U_c, w_c = the state cotangent after chunk c: dS_final + sum over the
#                                       queries of later chunks of a_i g_i^T (and r_i a_i), summed over the group;
#   _chunk_out_kernel, _chunk_dq_kernel (all chunks at once): out and den, then dq, of one chunk of one head from
#                                       (S_c, z_c) and the chunk's own keys;
#   _chunk_dkdv_kernel (all chunks at once): dk, dv of one chunk of one KV head from (U_c, w_c) and the chunk's
#                                       own queries of the group.
# The forward walk's per-chunk states are a residual of the forward, so the backward runs one walk only.
# With g_i = do_i / den_i and r_i = -do_i . out_i / den_i (the cotangents of the numerator and the normaliser;
# the dq kernel writes r, which the reverse walk and the dk/dv kernel then read):
#   d a_i = S_c g_i + r_i z_c + sum_{j <= i in chunk} (g_i . v_j + r_i) b_j
#   d b_j = U_c v_j + w_c + sum_{i >= j in chunk} (g_i . v_j + r_i) a_i
#   dv_j  = U_c^T b_j + sum_{i >= j in chunk} (a_i . b_j) g_i
# Non-causal is the same with one "chunk": S, z the final state, U, w the totals, no in-chunk sums.
# The walks carry one value-column tile of the state each, so (batch, kv_heads, d / tile) programs run them.


def _store_chunk_state(chunk_refs, c, state: jax.Array, state_sum: jax.Array, first_tile: jax.Array) -> None:
    """A walk's per-chunk outputs: ``state`` (this program's columns) at chunk ``c``; its sum from tile 0 only."""
    states_ref, sums_ref = chunk_refs
    states_ref[c] = state.astype(states_ref.dtype)
    plgpu.store(sums_ref.at[c], state_sum, mask=jnp.broadcast_to(first_tile, state_sum.shape))


def _state_kernel(k_ref, v_ref, kv0_ref, ksum0_ref, kv_ref, ksum_ref, *chunk_refs, feature_map, seq_len, chunk):
    """Grid (batch, kv_heads, value tiles). S[:, tile] = S0[:, tile] + sum_j b_j v_j[tile]^T and z = z0 + sum_j b_j;
    with ``chunk_refs`` also the state before every chunk (z from tile 0)."""
    d = k_ref.shape[-1]
    tile_v = v_ref.shape[-1]
    dot = functools.partial(_dot, dtype=k_ref.dtype)
    rows = jnp.arange(chunk, dtype=jnp.int32)
    first_tile = pl.program_id(2) == 0

    def body(c, carry):
        s, z = carry
        start = c * chunk
        valid = start + rows < seq_len
        tile = (pl.ds(start, chunk), slice(None))
        _, b = _keys(k_ref.at[tile], _row_mask(valid, d), feature_map)
        v = _load(v_ref.at[tile], _row_mask(valid, tile_v))
        if chunk_refs:
            _store_chunk_state(chunk_refs, c, s, z, first_tile)
        return s + dot(b.astype(k_ref.dtype), v, trans_a=True), z + jnp.sum(b, axis=0)

    s, z = lax.fori_loop(0, pl.cdiv(seq_len, chunk), body, (kv0_ref[...], ksum0_ref[...]))
    kv_ref[...] = s
    plgpu.store(ksum_ref, z, mask=jnp.broadcast_to(first_tile, (d,)))


def _state_grad_kernel(
    q_ref, do_ref, den_ref, r_ref, dkv_ref, dksum_ref, u_ref, w_ref, *chunk_refs, feature_map, seq_len, chunk, group,
):
    """Grid (batch, kv_heads, value tiles). Walks the chunks in reverse from the final-state cotangent, adding
    sum_{h in group, i} a_i g_i[tile]^T to U[:, tile] and r_i a_i to w; ends with the cotangent of the initial state.
    With ``chunk_refs`` also (U, w) after every chunk, before its own queries are added (w from tile 0)."""
    d = q_ref.shape[-1]
    tile_v = do_ref.shape[-1]
    dot = functools.partial(_dot, dtype=q_ref.dtype)
    rows = jnp.arange(chunk, dtype=jnp.int32)
    first_tile = pl.program_id(2) == 0
    num_chunks = pl.cdiv(seq_len, chunk)

    def body(i, carry):
        c = num_chunks - 1 - i
        start = c * chunk
        valid = start + rows < seq_len
        if chunk_refs:
            _store_chunk_state(chunk_refs, c, *carry, first_tile)

        def head(h, acc):
            u, w = acc
            q_tile = (pl.ds(start, chunk), h, slice(None))
            a = _phi(_load32(q_ref.at[q_tile], _row_mask(valid, d)), feature_map)
            den = _load(den_ref.at[h, pl.ds(start, chunk)], valid, other=1.0)
            r = _load(r_ref.at[h, pl.ds(start, chunk)], valid)
            # Padded queries have do = 0 and r = 0, so they add nothing.
            g = (_load32(do_ref.at[q_tile], _row_mask(valid, tile_v)) / den[:, None]).astype(q_ref.dtype)
            return u + dot(a.astype(q_ref.dtype), g, trans_a=True), w + jnp.sum(r[:, None] * a, axis=0)

        return lax.fori_loop(0, group, head, carry)

    u, w = lax.fori_loop(0, num_chunks, body, (dkv_ref[...], dksum_ref[...]))
    u_ref[...] = u
    plgpu.store(w_ref, w, mask=jnp.broadcast_to(first_tile, (d,)))


def _program_chunk(chunk: int, seq_len: int, d: int):
    """The chunk of a chunk-parallel program (third grid axis): its first row, row numbers, in-sequence rows, their
    ``[chunk, d]`` mask and the tile index of the chunk's rows."""
    # The default int dtype (int64 under jax_enable_x64), as the indices Pallas's interpreter gives masked stores.
    start = (pl.program_id(2) * chunk).astype(jax.dtypes.canonicalize_dtype(jnp.int64))
    rows = jnp.arange(chunk, dtype=jnp.int32)
    valid = start + rows < seq_len
    return start, rows, valid, _row_mask(valid, d), (pl.ds(start, chunk), slice(None))


def _chunk_out_kernel(q_ref, k_ref, v_ref, s_ref, z_ref, o_ref, den_ref, *, feature_map, seq_len, chunk, causal):
    """Grid (batch, heads, chunks). out = (a @ S_c + sum_{j <= i in chunk} (a_i . b_j) v_j) / den and the normaliser
    den = a . z_c + sum_{j <= i in chunk} a_i . b_j + eps, from the state (S_c, z_c) before the chunk (causal) or the
    final state and no in-chunk sums (non-causal)."""
    dot = functools.partial(_dot, dtype=q_ref.dtype)
    start, rows, valid, mask, tile = _program_chunk(chunk, seq_len, q_ref.shape[-1])
    a = _phi(_load32(q_ref.at[tile], mask), feature_map)
    den = jnp.sum(a * z_ref[...][None, :], axis=1) + _EPS
    a = a.astype(q_ref.dtype)
    num = dot(a, s_ref[...])
    if causal:
        b = _keys(k_ref.at[tile], mask, feature_map)[1].astype(q_ref.dtype)
        att = jnp.where(rows[:, None] >= rows[None, :], dot(a, b, trans_b=True), 0.0)
        num = num + dot(att, _load(v_ref.at[tile], mask))
        den = den + jnp.sum(att, axis=1)
    plgpu.store(o_ref.at[tile], (num / den[:, None]).astype(o_ref.dtype), mask=mask)
    plgpu.store(den_ref.at[pl.ds(start, chunk)], den, mask=valid)


def _chunk_dq_kernel(
    q_ref, k_ref, v_ref, do_ref, out_ref, den_ref, s_ref, z_ref, dq_ref, r_ref, *, feature_map, seq_len, chunk, causal,
):
    """Grid (batch, heads, chunks). dq of one chunk of one head from the chunk's (S, z) (see the section comment),
    and r = -do . out / den of its queries for the other kernels."""
    dot = functools.partial(_dot, dtype=q_ref.dtype)
    start, rows, valid, mask, tile = _program_chunk(chunk, seq_len, q_ref.shape[-1])
    den = _load(den_ref.at[pl.ds(start, chunk)], valid, other=1.0)
    do = _load32(do_ref.at[tile], mask)
    # Padded queries have do = 0, hence g = 0 and r = 0.
    r = -jnp.sum(do * _load32(out_ref.at[tile], mask), axis=1) / den
    plgpu.store(r_ref.at[pl.ds(start, chunk)], r, mask=valid)
    # Tiles that only feed dots are kept in the input dtype: half the registers of fp32 copies.
    g = (do / den[:, None]).astype(q_ref.dtype)
    da = dot(g, s_ref[...], trans_b=True) + r[:, None] * z_ref[...][None, :]
    if causal:
        b = _keys(k_ref.at[tile], mask, feature_map)[1].astype(q_ref.dtype)
        v = _load(v_ref.at[tile], mask)
        m = jnp.where(rows[:, None] >= rows[None, :], dot(g, v, trans_b=True) + r[:, None], 0.0)
        da = da + dot(m, b)
    x = _load32(q_ref.at[tile], mask)
    plgpu.store(dq_ref.at[tile], _phi_vjp(x, da, feature_map).astype(dq_ref.dtype), mask=mask)


def _chunk_dkdv_kernel(
    q_ref, k_ref, v_ref, do_ref, den_ref, r_ref, u_ref, w_ref, dk_ref, dv_ref, *, feature_map, seq_len, chunk, group,
    causal,
):
    """Grid (batch, kv_heads, chunks). dk, dv of one chunk's keys, summed over the group's query heads, from the
    chunk's (U, w) (see the section comment)."""
    dot = functools.partial(_dot, dtype=k_ref.dtype)
    start, rows, valid, mask, tile = _program_chunk(chunk, seq_len, k_ref.shape[-1])
    # Tiles that only feed dots are kept in the input dtype: half the registers of fp32 copies.
    b = _keys(k_ref.at[tile], mask, feature_map)[1].astype(k_ref.dtype)
    v = _load(v_ref.at[tile], mask)
    u = u_ref[...]
    db, dv = dot(v, u, trans_b=True) + w_ref[...][None, :], dot(b, u)
    if causal:
        # The in-chunk matrices are built transposed, [keys, queries], so that no dot transposes an operand.
        later = rows[:, None] <= rows[None, :]

        def head(h, acc):
            db, dv = acc
            q_tile = (pl.ds(start, chunk), h, slice(None))
            a = _phi(_load32(q_ref.at[q_tile], mask), feature_map).astype(k_ref.dtype)
            den = _load(den_ref.at[h, pl.ds(start, chunk)], valid, other=1.0)
            r = _load(r_ref.at[h, pl.ds(start, chunk)], valid)
            g = (_load32(do_ref.at[q_tile], mask) / den[:, None]).astype(k_ref.dtype)
            m_t = jnp.where(later, dot(v, g, trans_b=True) + r[None, :], 0.0).astype(k_ref.dtype)
            att_t = jnp.where(later, dot(b, a, trans_b=True), 0.0).astype(k_ref.dtype)
            return db + dot(m_t, a), dv + dot(att_t, g)

        db, dv = lax.fori_loop(0, group, head, (db, dv))
    y = _load32(k_ref.at[tile], mask)
    plgpu.store(dk_ref.at[tile], _phi_vjp(y, db, feature_map).astype(dk_ref.dtype), mask=mask)
    plgpu.store(dv_ref.at[tile], dv.astype(dv_ref.dtype), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# pallas_call wrappers.


class _Specs:
    """BlockSpecs for a grid whose first two axes are (batch, head axis); ``by_kv`` if that axis is KV heads.

    The sequence axis is one whole-length window that the kernels index with power-of-2 ``pl.ds`` tiles. With
    ``tiled=True`` (``state``: ``"cols"``) a spec takes the ``tile`` columns numbered by the third
    grid axis, which must then be the head_dim tile.
    """

    def __init__(self, seq_len: int, d: int, group: int, by_kv: bool, tile: int | None = None):
        self.seq_len, self.d, self.group, self.by_kv, self.tile = seq_len, d, group, by_kv, tile

    def _kv_head(self, h):
        return h if self.by_kv else int_div(h, self.group)

    def q(self, tiled: bool = False) -> pl.BlockSpec:
        """[batch, seq, heads, d]: one head, or the whole group when the grid runs over KV heads."""
        heads = self.group if self.by_kv else None
        if tiled:
            return pl.BlockSpec((None, self.seq_len, heads, self.tile), lambda b, h, j: (b, 0, h, j))
        return pl.BlockSpec((None, self.seq_len, heads, self.d), lambda b, h, *_: (b, 0, h, 0))

    def kv(self, tiled: bool = False) -> pl.BlockSpec:
        """[batch, seq, kv_heads, d]."""
        if tiled:
            return pl.BlockSpec((None, self.seq_len, None, self.tile), lambda b, h, j: (b, 0, self._kv_head(h), j))
        return pl.BlockSpec((None, self.seq_len, None, self.d), lambda b, h, *_: (b, 0, self._kv_head(h), 0))

    def rows(self) -> pl.BlockSpec:
        """[batch, heads, seq] per-query scalars."""
        if self.by_kv:
            return pl.BlockSpec((None, self.group, self.seq_len), lambda b, h, *_: (b, h, 0))
        return pl.BlockSpec((None, None, self.seq_len), lambda b, h, *_: (b, h, 0))

    def state(self, tiled: Literal["cols"] | None = None) -> pl.BlockSpec:
        """[batch, kv_heads, d, d]."""
        if tiled == "cols":
            return pl.BlockSpec((None, None, self.d, self.tile), lambda b, h, j: (b, self._kv_head(h), 0, j))
        return pl.BlockSpec((None, None, self.d, self.d), lambda b, h, *_: (b, self._kv_head(h), 0, 0))

    def state_sum(self) -> pl.BlockSpec:
        """[batch, kv_heads, d]."""
        return pl.BlockSpec((None, None, self.d), lambda b, h, *_: (b, self._kv_head(h), 0))

    def chunk_outputs(self, batch: int, kv_heads: int, num_chunks: int, dtype, like: Array) -> tuple[list, list]:
        """(specs, shapes) of a walk's per-chunk outputs: every chunk's state ``[batch, kv_heads, chunks, d, d]`` in
        ``dtype`` (the ``tile`` columns of the third grid axis per program) and its sum ``[.., chunks, d]`` in fp32;
        they vary over the manual mesh axes of ``like``."""
        specs = [
            pl.BlockSpec((None, None, num_chunks, self.d, self.tile), lambda b, h, j: (b, h, 0, 0, j)),
            pl.BlockSpec((None, None, num_chunks, self.d), lambda b, h, *_: (b, h, 0, 0)),
        ]
        shapes = [
            out_struct((batch, kv_heads, num_chunks, self.d, self.d), dtype, like),
            out_struct((batch, kv_heads, num_chunks, self.d), jnp.float32, like),
        ]
        return specs, shapes

    def state_of_chunk(self, per_chunk: bool) -> pl.BlockSpec:
        """[batch, kv_heads, chunks, d, d] on a (batch, head axis, chunks) grid: the program's chunk, or the only one."""
        return pl.BlockSpec(
            (None, None, None, self.d, self.d), lambda b, h, c: (b, self._kv_head(h), c if per_chunk else 0, 0, 0)
        )

    def sum_of_chunk(self, per_chunk: bool) -> pl.BlockSpec:
        """[batch, kv_heads, chunks, d], as ``state_of_chunk``."""
        return pl.BlockSpec((None, None, None, self.d), lambda b, h, c: (b, self._kv_head(h), c if per_chunk else 0, 0))


def _call(kernel, cfg: _Config, grid, in_specs, out_specs, out_shape, name: str, d: int, **kwargs):
    return pl.pallas_call(
        functools.partial(kernel, feature_map=cfg.feature_map, chunk=cfg.chunk, **kwargs),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=compiler_params(num_warps=4 if d <= 64 else 8, num_stages=2),
        interpret=cfg.interpret,
        name=name,
    )


class _ChunkStates(NamedTuple):
    """A walk's state before (forward) or cotangent after (reverse) every chunk: ``kv`` in the input dtype
    ``[batch, kv_heads, chunks, d, d]``, ``k_sum`` fp32 ``[.., chunks, d]``; for non-causal attention the one state
    (or cotangent) of the whole sequence as a single chunk."""

    kv: jax.Array
    k_sum: jax.Array


def _forward(cfg: _Config, q: QArray, k: KVArray, v: KVArray, kv0: StateKV, ksum0: StateSum):
    """Output, final state, the normaliser den [batch, heads, seq] (fp32) and the ``_ChunkStates`` it used."""
    batch, seq_len, heads, d = q.shape
    kv, ksum, states = _states(cfg, k, v, kv0, ksum0)
    sp = _Specs(seq_len, d, heads // k.shape[2], by_kv=False)
    out, den = _call(
        _chunk_out_kernel, cfg, (batch, heads, pl.cdiv(seq_len, cfg.chunk)),
        [sp.q(), sp.kv(), sp.kv(), sp.state_of_chunk(cfg.causal), sp.sum_of_chunk(cfg.causal)],
        [sp.q(), sp.rows()],
        [out_struct(q.shape, q.dtype, q), out_struct((batch, heads, seq_len), jnp.float32, q)],
        "linear_attention_chunk_out", d, seq_len=seq_len, causal=cfg.causal,
    )(q, k, v, states.kv, states.k_sum)
    return out, kv, ksum, den, states


def _walk(cfg: _Config, kernel, name: str, heads_per_kv: int, in_specs, args: tuple, final: tuple, chunk_dtype,
          **kwargs):
    """Launches a state walk (``_state_kernel`` or ``_state_grad_kernel``) over (batch, kv_heads, value tiles):
    its final state and sum, shaped as ``final`` (fp32), and the ``_ChunkStates`` in ``chunk_dtype``: the kernel's
    per-chunk outputs if causal, else the final state itself as the one chunk. ``in_specs`` maps a ``_Specs`` to
    the specs of ``args`` (whose query-head arrays hold ``heads_per_kv`` heads per program); ``kwargs`` go to
    the kernel."""
    batch, kv_heads, d = final[1].shape
    seq_len = args[0].shape[1]
    tile, num_chunks = min(d, cfg.tile), pl.cdiv(seq_len, cfg.chunk)
    sp = _Specs(seq_len, d, heads_per_kv, by_kv=True, tile=tile)
    out_specs = [sp.state("cols"), sp.state_sum()]
    out_shape = [out_struct(x.shape, jnp.float32, args[0]) for x in final]
    if cfg.causal:
        specs, shapes = sp.chunk_outputs(batch, kv_heads, num_chunks, chunk_dtype, args[0])
        out_specs, out_shape = out_specs + specs, out_shape + shapes
    state, state_sum, *chunks = _call(
        kernel, cfg, (batch, kv_heads, d // tile), in_specs(sp), out_specs, out_shape, name, d, seq_len=seq_len,
        **kwargs,
    )(*args, *final)
    if cfg.causal:
        return state, state_sum, _ChunkStates(*chunks)
    return state, state_sum, _ChunkStates(state[:, :, None].astype(chunk_dtype), state_sum[:, :, None])


def _states(cfg: _Config, k: KVArray, v: KVArray, kv0: StateKV, ksum0: StateSum):
    """``_state_kernel``: the final state (fp32) and the ``_ChunkStates`` (per chunk if causal)."""
    in_specs = lambda sp: [sp.kv(), sp.kv(tiled=True), sp.state("cols"), sp.state_sum()]
    return _walk(cfg, _state_kernel, "linear_attention_states", 1, in_specs, (k, v), (kv0, ksum0), k.dtype)


def _state_grads(cfg: _Config, q: QArray, do: QArray, den, r, dkv_final: StateKV, dksum_final: StateSum):
    """``_state_grad_kernel``: the initial-state cotangent and the ``_ChunkStates`` of (U, w): after every chunk
    if causal, else the initial-state cotangent itself."""
    group = q.shape[2] // dkv_final.shape[1]
    in_specs = lambda sp: [sp.q(), sp.q(tiled=True), sp.rows(), sp.rows(), sp.state("cols"), sp.state_sum()]
    return _walk(cfg, _state_grad_kernel, "linear_attention_state_grads", group, in_specs, (q, do, den, r),
                 (dkv_final, dksum_final), q.dtype, group=group)


def _chunk_dq(cfg: _Config, q: QArray, k: KVArray, v: KVArray, do: QArray, out: QArray, den,
              states: _ChunkStates) -> tuple[QArray, Float[Array, "batch heads seq"]]:
    """``_chunk_dq_kernel`` over all chunks of every head at once: dq and r."""
    batch, seq_len, heads, d = q.shape
    sp = _Specs(seq_len, d, heads // k.shape[2], by_kv=False)
    return _call(
        _chunk_dq_kernel, cfg, (batch, heads, pl.cdiv(seq_len, cfg.chunk)),
        [sp.q(), sp.kv(), sp.kv(), sp.q(), sp.q(), sp.rows(), sp.state_of_chunk(cfg.causal),
         sp.sum_of_chunk(cfg.causal)],
        [sp.q(), sp.rows()],
        [out_struct(q.shape, q.dtype, q), out_struct(den.shape, jnp.float32, q)],
        "linear_attention_chunk_dq", d, seq_len=seq_len, causal=cfg.causal,
    )(q, k, v, do, out, den, states.kv, states.k_sum)


def _chunk_dkdv(cfg: _Config, q: QArray, k: KVArray, v: KVArray, do: QArray, den, r, grads: _ChunkStates):
    """``_chunk_dkdv_kernel`` over all chunks of every KV head at once: (dk, dv)."""
    batch, seq_len, heads, d = q.shape
    kv_heads = k.shape[2]
    sp = _Specs(seq_len, d, heads // kv_heads, by_kv=True)
    return _call(
        _chunk_dkdv_kernel, cfg, (batch, kv_heads, pl.cdiv(seq_len, cfg.chunk)),
        [sp.q(), sp.kv(), sp.kv(), sp.q(), sp.rows(), sp.rows(), sp.state_of_chunk(cfg.causal),
         sp.sum_of_chunk(cfg.causal)],
        [sp.kv(), sp.kv()],
        [out_struct(k.shape, k.dtype, q), out_struct(v.shape, v.dtype, q)],
        "linear_attention_chunk_dkdv", d, seq_len=seq_len, group=heads // kv_heads, causal=cfg.causal,
    )(q, k, v, do, den, r, grads.kv, grads.k_sum)


def _backward(
    cfg: _Config, q: QArray, k: KVArray, v: KVArray, out: QArray, den, states: _ChunkStates,
    do: QArray, dkv_final: StateKV, dksum_final: StateSum,
) -> tuple[QArray, KVArray, KVArray, StateKV, StateSum]:
    """Cotangents of (q, k, v, initial kv, initial k_sum), reading the forward's ``states``."""
    dq, r = _chunk_dq(cfg, q, k, v, do, out, den, states)
    dkv0, dksum0, grads = _state_grads(cfg, q, do, den, r, dkv_final, dksum_final)
    dk, dv = _chunk_dkdv(cfg, q, k, v, do, den, r, grads)
    return dq, dk, dv, dkv0, dksum0


def _state_layout(x) -> str:
    """Layout (``_partitioning``) of a state-like array: batch, KV heads, then whole dimensions."""
    return "bk" + "." * (x.ndim - 2)


def _sharded_forward(cfg: _Config, q, k, v, kv0, ksum0):
    """``_forward`` with its chunk states flattened, each device running its batch rows and heads under ``jit``."""

    def kernel(q, k, v, kv0, ksum0):
        out, kv, ksum, den, states = _forward(cfg, q, k, v, kv0, ksum0)
        return out, kv, ksum, den, states.kv, states.k_sum

    args = (q, k, v, kv0, ksum0)
    if not _partitioning.wanted():
        out, kv, ksum, den, *states = kernel(*args)
    else:
        shapes = jax.eval_shape(kernel, *args)
        out_layouts = ("b.h.", "bk..", "bk.", "bh.", *map(_state_layout, shapes[4:]))
        out, kv, ksum, den, *states = _partitioning.partitioned(
            kernel, ("b.h.", "b.k.", "b.k.", "bk..", "bk."), out_layouts, group=q.shape[2] // k.shape[2],
            heads_splittable=True,
        )(*args)
    return out, kv, ksum, den, _ChunkStates(*states)


def _sharded_backward(cfg: _Config, q, k, v, out, den, states: _ChunkStates, do, dkv_final, dksum_final):
    """``_backward``, partitioned as ``_sharded_forward``."""
    kernel = lambda q, k, v, out, den, s_kv, s_sum, *rest: _backward(cfg, q, k, v, out, den, _ChunkStates(s_kv, s_sum),
                                                                   *rest)
    args = (q, k, v, out, den, states.kv, states.k_sum, do, dkv_final, dksum_final)
    if not _partitioning.wanted():
        return kernel(*args)
    in_layouts = ("b.h.", "b.k.", "b.k.", "b.h.", "bh.", *map(_state_layout, states), "b.h.", "bk..", "bk.")
    return _partitioning.partitioned(
        kernel, in_layouts, ("b.h.", "b.k.", "b.k.", "bk..", "bk."), group=q.shape[2] // k.shape[2],
        heads_splittable=True,
    )(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _linear_attention(
    cfg: _Config, q: QArray, k: KVArray, v: KVArray, kv0: StateKV, ksum0: StateSum
) -> tuple[QArray, StateKV, StateSum]:
    return _sharded_forward(cfg, q, k, v, kv0, ksum0)[:3]


def _linear_attention_fwd(cfg: _Config, q, k, v, kv0, ksum0):
    reject_higher_order("linear_attention", q, k, v, kv0, ksum0)
    out, kv, ksum, den, states = _sharded_forward(cfg, q, k, v, kv0, ksum0)
    # O(seq) residuals: the state before every chunk (input dtype) feeds the backward's dq directly.
    return (out, kv, ksum), (q, k, v, out, den, states)


def _linear_attention_bwd(cfg: _Config, residuals, cotangents):
    reject_higher_order("linear_attention", residuals, cotangents)
    return _sharded_backward(cfg, *residuals, *cotangents)


_linear_attention.defvjp(_linear_attention_fwd, _linear_attention_bwd)


def _default_chunk(seq_len: int, d: int, itemsize: int) -> int:
    """Sequence chunk of every kernel: 128 rows for 2-byte inputs up to head_dim 128, else 64 rows capped so that
    a [chunk, d] input tile stays within 16 KiB (larger fp32 tiles overflowed shared memory); at least 16 (Triton
    dots), at most the padded sequence.

    Measured on an H200 (bf16, d128, S=32768, ``benchmarks/profile_linear.py``, BENCHMARKS.md): forward 2.51 ms
    at chunk 128 vs 3.14 at 64; the state walks 1.13 + 1.58 ms vs 1.61 + 1.89 (8 warps); dq equal.
    """
    cap = pl.next_power_of_2(seq_len)
    if itemsize == 2 and d <= 128:
        return max(16, min(128, cap))
    return max(16, min(64, 16384 // (d * itemsize), cap))


def linear_attention(
    q: Float[Array, "batch seq heads head_dim"],
    k: Float[Array, "batch seq kv_heads head_dim"],
    v: Float[Array, "batch seq kv_heads head_dim"],
    *,
    feature_map: FeatureMap,
    causal: bool,
    initial_state: LinearState | None,
    interpret: bool = False,
    chunk_size: int | None = None,
) -> tuple[Float[Array, "batch seq heads head_dim"], LinearState]:
    """Linear attention with feature map ``phi`` in {"elu" (elu + 1), "relu", "softmax" (over head_dim)}.

    ``out_i = phi(q_i) @ S_i / (phi(q_i) . z_i + 1e-6)`` with ``S_i = S0 + sum_j phi(k_j) v_j^T`` and
    ``z_i = z0 + sum_j phi(k_j)``, summing over ``j <= i`` if ``causal`` else over the whole sequence; ``(S0, z0)``
    is ``initial_state`` (zeros if None). No softmax scale. Query head ``h`` uses KV head ``h // (heads //
    kv_heads)``. Returns the output in ``q.dtype`` and the float32 final state (sums over the whole sequence),
    which can itself be differentiated. ``chunk_size`` (a power of 2, at least 16) is the sequence tile of every
    kernel, forward and backward; by default the measured best (``_default_chunk``).
    """
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
        raise ValueError(f"expected q [b, t, h, d] and k, v [b, t, kv_h, d]; got {q.shape}, {k.shape}, {v.shape}")
    batch, seq_len, heads, d = q.shape
    kv_heads = k.shape[2]
    if k.shape[:2] != (batch, seq_len) or k.shape[3] != d:
        raise ValueError(f"k and v {k.shape} do not match q {q.shape}")
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    if d < 16 or d & (d - 1):
        raise NotImplementedError(f"head_dim must be a power of 2 of at least 16 (Triton tiles), got {d}")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in _DTYPES:
        raise NotImplementedError(f"q, k, v must share one of {_DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}")
    if feature_map not in _FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {_FEATURE_MAPS}, got {feature_map!r}")
    if chunk_size is None:
        chunk_size = _default_chunk(seq_len, d, _compute_dtype(q.dtype).itemsize)
    elif chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of 2 of at least 16, got {chunk_size}")

    if initial_state is None:
        kv0 = jnp.zeros((batch, kv_heads, d, d), jnp.float32)
        ksum0 = jnp.zeros((batch, kv_heads, d), jnp.float32)
    else:
        kv0 = initial_state.kv.astype(jnp.float32)
        ksum0 = initial_state.k_sum.astype(jnp.float32)
        if kv0.shape != (batch, kv_heads, d, d) or ksum0.shape != (batch, kv_heads, d):
            raise ValueError(f"initial_state shapes {kv0.shape}, {ksum0.shape} do not match k {k.shape}")

    cfg = _Config(feature_map, bool(causal), chunk_size, interpret, _TILE)
    compute = _compute_dtype(q.dtype)
    out, kv, ksum = _linear_attention(cfg, q.astype(compute), k.astype(compute), v.astype(compute), kv0, ksum0)
    return out.astype(q.dtype), LinearState(kv, ksum)


def _compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """The kernels' operand dtype: the input's, except float32 for float16. float16's range (65504) is too small
    for the ``phi(q) . phi(k)`` products and the per-chunk states (inputs of magnitude ~100, or a long sequence of
    positive values, overflowed to inf), so float16 runs the float32 kernels; bfloat16 has float32's range."""
    return jnp.dtype(jnp.float32) if dtype == jnp.float16 else jnp.dtype(dtype)
