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

Packed sequences and padded rows (``segment_ids``, ``query_lengths``, ``kv_lengths``) reach the kernels as one
per-position int32 id array for queries and one for keys, under a static flag (the unpacked kernels are unchanged):
the sums run within each segment, the state restarting at segment starts inside chunks too; non-causal packed rows add
a reverse walk of suffix states forward and its cotangent walk backward (see the comment above ``_KEY_PADDING``).
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from pallas_kernels import _partitioning
from pallas_kernels._autodiff import reject_higher_order
from pallas_kernels._vma import out_struct, vary_like
from pallas_kernels.block_ranges import int_div
from pallas_kernels.masks import segment_starts
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
    segmented: bool = False  # packed or padded rows: the kernels take per-position segment ids

    @property
    def per_chunk(self) -> bool:
        """Whether the walks store their state at every chunk (else the whole sequence is one chunk)."""
        return self.causal or self.segmented

    @property
    def two_sided(self) -> bool:
        """Non-causal packed rows: queries also read the keys after them in their segment (the suffix states)."""
        return self.segmented and not self.causal


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
#
# Packed and padded rows (static ``segmented``) add one input, per-position int32 ids of queries and of keys
# (``_kernel_ids``): a segment's id is the position where it starts, -1 for the row's first segment (which continues
# the initial state), so ids rise along a row. Then, for chunk c starting at position t:
#   query i reads in-chunk key j iff their ids are equal (and j <= i if causal);
#   query i reads the carried state (S_c, z_c) iff id_i < t (its segment started before the chunk);
#   a segment starts in the chunk iff its largest key id e_c is >= t: the state restarts from zero, and only the
#   keys with id e_c (those of the segment open at the chunk's end) enter it.
# Padding keys (id -2) never enter a state or start a segment, padding queries (id 2**30) read nothing. The backward
# masks the same terms: the reverse walk zeroes U where the forward restarted and adds only the queries that read
# the carried state; dk/dv take U_c only for the keys that entered the state.
# Non-causal packed rows read both ways: each query also reads the in-chunk keys of its segment after it, and the
# keys after the chunk through a suffix state R_c (a reverse walk of _state_kernel: the keys after chunk c of the
# segment open at its end, read by the queries with id e_c); its cotangent V_c is a forward walk of
# _state_grad_kernel (V before chunk c feeds dk/dv of the chunk's keys of the segment open at its start, id < t).

_KEY_PADDING = -2  # id of a key at or past kv_lengths: of no segment
_NO_QUERY = 2**30  # id of a query that reads nothing: at or past query_lengths, or in a segment without keys


def _store_chunk_state(states_ref, sums_ref, c, state: jax.Array, state_sum: jax.Array,
                       first_tile: jax.Array) -> None:
    """A walk's per-chunk outputs: ``state`` (this program's columns) at chunk ``c``; its sum from tile 0 only."""
    states_ref[c] = state.astype(states_ref.dtype)
    plgpu.store(sums_ref.at[c], state_sum, mask=jnp.broadcast_to(first_tile, state_sum.shape))


def _load_ids(ids_ref, start, chunk: int, valid: jax.Array, other: int) -> jax.Array:
    """The ids of a chunk's rows (``other`` past the sequence)."""
    return _load(ids_ref.at[pl.ds(start, chunk)], valid, other=other)


def _segment_end(kid: jax.Array) -> jax.Array:
    """The id of the segment open at the end of a chunk with key ids ``kid``, if it has a valid key (else at most
    -1); a segment starts in the chunk iff it is at least the chunk's first position."""
    return jnp.maximum(jnp.max(kid), -1)


def _entering(kid: jax.Array, start, before: bool) -> jax.Array:
    """Which keys of a chunk enter the state after it (those of the segment open at its end), or with ``before``
    the suffix state before it (those of the segment open at its start)."""
    if before:
        return (kid >= -1) & (kid < start)
    return kid == _segment_end(kid)


class _Reads(NamedTuple):
    """What each query of a packed chunk reads (see the section comment)."""

    carried: jax.Array  # [chunk] the state carried into the chunk
    suffix: jax.Array  # [chunk] the suffix state after the chunk (non-causal)
    keys: jax.Array  # [chunk, chunk] the in-chunk keys; [keys, queries] if transposed


def _chunk_reads(qid_ref, kid_ref, start, rows, valid, causal: bool, transposed: bool = False) -> _Reads:
    chunk = rows.shape[0]
    qid = _load_ids(qid_ref, start, chunk, valid, _NO_QUERY)
    kid = _load_ids(kid_ref, start, chunk, valid, _KEY_PADDING)
    if transposed:
        keys = kid[:, None] == qid[None, :]
        order = rows[:, None] <= rows[None, :]
    else:
        keys = qid[:, None] == kid[None, :]
        order = rows[:, None] >= rows[None, :]
    return _Reads(qid < start, qid == _segment_end(kid), keys & order if causal else keys)


def _state_kernel(
    *, k_ref, v_ref, kv0_ref, ksum0_ref, kv_ref, ksum_ref, states_ref=None, sums_ref=None, kid_ref=None,
    feature_map, seq_len, chunk, reverse=False,
):
    """Grid (batch, kv_heads, value tiles). S[:, tile] = S0[:, tile] + sum_j b_j v_j[tile]^T and z = z0 + sum_j b_j;
    with ``states_ref`` also the state before every chunk (z from tile 0). With ``kid_ref`` (packed rows) the state
    restarts at each segment start; with ``reverse`` it walks from the last chunk and stores the state after every
    chunk: the suffix states R_c (see the section comment)."""
    d = k_ref.shape[-1]
    tile_v = v_ref.shape[-1]
    dot = functools.partial(_dot, dtype=k_ref.dtype)
    rows = jnp.arange(chunk, dtype=jnp.int32)
    first_tile = pl.program_id(2) == 0
    num_chunks = pl.cdiv(seq_len, chunk)

    def body(i, carry):
        s, z = carry
        c = num_chunks - 1 - i if reverse else i
        start = c * chunk
        valid = start + rows < seq_len
        tile = (pl.ds(start, chunk), slice(None))
        _, b = _keys(k_ref.at[tile], _row_mask(valid, d), feature_map)
        v = _load(v_ref.at[tile], _row_mask(valid, tile_v))
        if states_ref is not None:
            _store_chunk_state(states_ref, sums_ref, c, s, z, first_tile)
        if kid_ref is not None:
            kid = _load_ids(kid_ref, start, chunk, valid, _KEY_PADDING)
            b = jnp.where(_entering(kid, start, before=reverse)[:, None], b, 0.0)
            restart = _segment_end(kid) >= start
            s, z = jnp.where(restart, 0.0, s), jnp.where(restart, 0.0, z)
        return s + dot(b.astype(k_ref.dtype), v, trans_a=True), z + jnp.sum(b, axis=0)

    s, z = lax.fori_loop(0, num_chunks, body, (kv0_ref[...], ksum0_ref[...]))
    kv_ref[...] = s
    plgpu.store(ksum_ref, z, mask=jnp.broadcast_to(first_tile, (d,)))


def _state_grad_kernel(
    *, q_ref, do_ref, den_ref, r_ref, dkv_ref, dksum_ref, u_ref, w_ref, states_ref=None, sums_ref=None, qid_ref=None,
    kid_ref=None, feature_map, seq_len, chunk, group, reverse=True,
):
    """Grid (batch, kv_heads, value tiles). Walks the chunks in reverse from the final-state cotangent, adding
    sum_{h in group, i} a_i g_i[tile]^T to U[:, tile] and r_i a_i to w; ends with the cotangent of the initial state.
    With ``states_ref`` also (U, w) after every chunk, before its own queries are added (w from tile 0). With
    ``qid_ref`` (packed rows) only the queries that read the carried state add to it, and it restarts where the
    forward's state did; with ``reverse=False`` it walks forward from zero: the suffix states' cotangents V_c,
    stored before every chunk, to which the queries reading the suffix state add."""
    d = q_ref.shape[-1]
    tile_v = do_ref.shape[-1]
    dot = functools.partial(_dot, dtype=q_ref.dtype)
    rows = jnp.arange(chunk, dtype=jnp.int32)
    first_tile = pl.program_id(2) == 0
    num_chunks = pl.cdiv(seq_len, chunk)

    def body(i, carry):
        c = num_chunks - 1 - i if reverse else i
        start = c * chunk
        valid = start + rows < seq_len
        if states_ref is not None:
            _store_chunk_state(states_ref, sums_ref, c, *carry, first_tile)
        reads = None
        if qid_ref is not None:
            qid = _load_ids(qid_ref, start, chunk, valid, _NO_QUERY)
            end = _segment_end(_load_ids(kid_ref, start, chunk, valid, _KEY_PADDING))
            reads = qid < start if reverse else qid == end
            carry = tuple(jnp.where(end >= start, 0.0, x) for x in carry)

        def head(h, acc):
            u, w = acc
            q_tile = (pl.ds(start, chunk), h, slice(None))
            a = _phi(_load32(q_ref.at[q_tile], _row_mask(valid, d)), feature_map)
            if reads is not None:
                a = jnp.where(reads[:, None], a, 0.0)
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


def _chunk_out_kernel(
    *, q_ref, k_ref, v_ref, s_ref, z_ref, o_ref, den_ref, rs_ref=None, rz_ref=None, qid_ref=None, kid_ref=None,
    feature_map, seq_len, chunk, causal,
):
    """Grid (batch, heads, chunks). out = (a @ S_c + sum_{j <= i in chunk} (a_i . b_j) v_j) / den and the normaliser
    den = a . z_c + sum_{j <= i in chunk} a_i . b_j + eps, from the state (S_c, z_c) before the chunk (causal) or the
    final state and no in-chunk sums (non-causal). With ``qid_ref`` (packed rows) each term counts only for the
    queries that read it, and non-causal adds the suffix state (rs, rz) and the in-chunk keys after each query."""
    dot = functools.partial(_dot, dtype=q_ref.dtype)
    start, rows, valid, mask, tile = _program_chunk(chunk, seq_len, q_ref.shape[-1])
    a = _phi(_load32(q_ref.at[tile], mask), feature_map)
    carried, visible = a, rows[:, None] >= rows[None, :]
    if qid_ref is not None:
        reads = _chunk_reads(qid_ref, kid_ref, start, rows, valid, causal)
        carried, visible = jnp.where(reads.carried[:, None], a, 0.0), reads.keys
    den = jnp.sum(carried * z_ref[...][None, :], axis=1) + _EPS
    num = dot(carried.astype(q_ref.dtype), s_ref[...])
    if rs_ref is not None:
        suffix = jnp.where(reads.suffix[:, None], a, 0.0)
        den = den + jnp.sum(suffix * rz_ref[...][None, :], axis=1)
        num = num + dot(suffix.astype(q_ref.dtype), rs_ref[...])
    a = a.astype(q_ref.dtype)
    if causal or qid_ref is not None:
        b = _keys(k_ref.at[tile], mask, feature_map)[1].astype(q_ref.dtype)
        att = jnp.where(visible, dot(a, b, trans_b=True), 0.0)
        num = num + dot(att, _load(v_ref.at[tile], mask))
        den = den + jnp.sum(att, axis=1)
    plgpu.store(o_ref.at[tile], (num / den[:, None]).astype(o_ref.dtype), mask=mask)
    plgpu.store(den_ref.at[pl.ds(start, chunk)], den, mask=valid)


def _chunk_dq_kernel(
    *, q_ref, k_ref, v_ref, do_ref, out_ref, den_ref, s_ref, z_ref, dq_ref, r_ref, rs_ref=None, rz_ref=None,
    qid_ref=None, kid_ref=None, feature_map, seq_len, chunk, causal,
):
    """Grid (batch, heads, chunks). dq of one chunk of one head from the chunk's (S, z) (see the section comment),
    and r = -do . out / den of its queries for the other kernels; packed rows as ``_chunk_out_kernel``."""
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
    visible = rows[:, None] >= rows[None, :]
    if qid_ref is not None:
        reads = _chunk_reads(qid_ref, kid_ref, start, rows, valid, causal)
        da, visible = jnp.where(reads.carried[:, None], da, 0.0), reads.keys
        if rs_ref is not None:
            da_suffix = dot(g, rs_ref[...], trans_b=True) + r[:, None] * rz_ref[...][None, :]
            da = da + jnp.where(reads.suffix[:, None], da_suffix, 0.0)
    if causal or qid_ref is not None:
        b = _keys(k_ref.at[tile], mask, feature_map)[1].astype(q_ref.dtype)
        v = _load(v_ref.at[tile], mask)
        m = jnp.where(visible, dot(g, v, trans_b=True) + r[:, None], 0.0)
        da = da + dot(m, b)
    x = _load32(q_ref.at[tile], mask)
    plgpu.store(dq_ref.at[tile], _phi_vjp(x, da, feature_map).astype(dq_ref.dtype), mask=mask)


def _chunk_dkdv_kernel(
    *, q_ref, k_ref, v_ref, do_ref, den_ref, r_ref, u_ref, w_ref, dk_ref, dv_ref, ru_ref=None, rw_ref=None,
    qid_ref=None, kid_ref=None, feature_map, seq_len, chunk, group, causal,
):
    """Grid (batch, kv_heads, chunks). dk, dv of one chunk's keys, summed over the group's query heads, from the
    chunk's (U, w) (see the section comment); with ``kid_ref`` (packed rows) for the keys that entered the state,
    and non-causal also the suffix cotangent (ru, rw) for those that entered the suffix state before the chunk."""
    dot = functools.partial(_dot, dtype=k_ref.dtype)
    start, rows, valid, mask, tile = _program_chunk(chunk, seq_len, k_ref.shape[-1])
    # Tiles that only feed dots are kept in the input dtype: half the registers of fp32 copies.
    b = _keys(k_ref.at[tile], mask, feature_map)[1].astype(k_ref.dtype)
    v = _load(v_ref.at[tile], mask)
    u = u_ref[...]
    db, dv = dot(v, u, trans_b=True) + w_ref[...][None, :], dot(b, u)
    # The in-chunk matrices are built transposed, [keys, queries], so that no dot transposes an operand.
    visible = rows[:, None] <= rows[None, :]
    if kid_ref is not None:
        kid = _load_ids(kid_ref, start, chunk, valid, _KEY_PADDING)
        entered = _entering(kid, start, before=False)[:, None]
        db, dv = jnp.where(entered, db, 0.0), dot(jnp.where(entered, b, 0.0), u)
        if ru_ref is not None:
            entered = _entering(kid, start, before=True)[:, None]
            ru = ru_ref[...]
            db = db + jnp.where(entered, dot(v, ru, trans_b=True) + rw_ref[...][None, :], 0.0)
            dv = dv + dot(jnp.where(entered, b, 0.0), ru)
        visible = _chunk_reads(qid_ref, kid_ref, start, rows, valid, causal, transposed=True).keys
    if causal or kid_ref is not None:

        def head(h, acc):
            db, dv = acc
            q_tile = (pl.ds(start, chunk), h, slice(None))
            a = _phi(_load32(q_ref.at[q_tile], mask), feature_map).astype(k_ref.dtype)
            den = _load(den_ref.at[h, pl.ds(start, chunk)], valid, other=1.0)
            r = _load(r_ref.at[h, pl.ds(start, chunk)], valid)
            g = (_load32(do_ref.at[q_tile], mask) / den[:, None]).astype(k_ref.dtype)
            m_t = jnp.where(visible, dot(v, g, trans_b=True) + r[None, :], 0.0).astype(k_ref.dtype)
            att_t = jnp.where(visible, dot(b, a, trans_b=True), 0.0).astype(k_ref.dtype)
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

    def ids(self) -> pl.BlockSpec:
        """[batch, seq] per-position ids (packed rows)."""
        return pl.BlockSpec((None, self.seq_len), lambda b, *_: (b, 0))

    def state(self, tiled: Literal["cols"] | None = None) -> pl.BlockSpec:
        """[batch, kv_heads, d, d]."""
        if tiled == "cols":
            return pl.BlockSpec((None, None, self.d, self.tile), lambda b, h, j: (b, self._kv_head(h), 0, j))
        return pl.BlockSpec((None, None, self.d, self.d), lambda b, h, *_: (b, self._kv_head(h), 0, 0))

    def state_sum(self) -> pl.BlockSpec:
        """[batch, kv_heads, d]."""
        return pl.BlockSpec((None, None, self.d), lambda b, h, *_: (b, self._kv_head(h), 0))

    def chunk_outputs(self, batch: int, kv_heads: int, num_chunks: int, dtype, like: Array) -> dict:
        """A walk's per-chunk outputs, by kernel argument: every chunk's state ``[batch, kv_heads, chunks, d, d]``
        in ``dtype`` (the ``tile`` columns of the third grid axis per program) and its sum ``[.., chunks, d]`` in
        fp32; they vary over the manual mesh axes of ``like``."""
        return {
            "states_ref": (pl.BlockSpec((None, None, num_chunks, self.d, self.tile), lambda b, h, j: (b, h, 0, 0, j)),
                           out_struct((batch, kv_heads, num_chunks, self.d, self.d), dtype, like)),
            "sums_ref": (pl.BlockSpec((None, None, num_chunks, self.d), lambda b, h, *_: (b, h, 0, 0)),
                         out_struct((batch, kv_heads, num_chunks, self.d), jnp.float32, like)),
        }

    def state_of_chunk(self, per_chunk: bool) -> pl.BlockSpec:
        """[batch, kv_heads, chunks, d, d] on a (batch, head axis, chunks) grid: the program's chunk, or the only one."""
        return pl.BlockSpec(
            (None, None, None, self.d, self.d), lambda b, h, c: (b, self._kv_head(h), c if per_chunk else 0, 0, 0)
        )

    def sum_of_chunk(self, per_chunk: bool) -> pl.BlockSpec:
        """[batch, kv_heads, chunks, d], as ``state_of_chunk``."""
        return pl.BlockSpec((None, None, None, self.d), lambda b, h, c: (b, self._kv_head(h), c if per_chunk else 0, 0))


def _call(kernel, cfg: "_Config", grid, inputs: dict, outputs: dict, name: str, d: int, **kwargs) -> list:
    """``pallas_call`` of ``kernel``, which takes its refs by name: ``inputs`` maps each name to a (BlockSpec, array)
    pair, ``outputs`` to a (BlockSpec, ShapeDtypeStruct) pair; returns the outputs in order."""
    names = [*inputs, *outputs]

    def body(*refs):
        kernel(**dict(zip(names, refs)), feature_map=cfg.feature_map, chunk=cfg.chunk, **kwargs)

    return pl.pallas_call(
        body,
        grid=grid,
        in_specs=[spec for spec, _ in inputs.values()],
        out_specs=[spec for spec, _ in outputs.values()],
        out_shape=[shape for _, shape in outputs.values()],
        compiler_params=compiler_params(num_warps=4 if d <= 64 else 8, num_stages=2),
        interpret=cfg.interpret,
        name=name,
    )(*(array for _, array in inputs.values()))


class _ChunkStates(NamedTuple):
    """A walk's state before (forward) or cotangent after (reverse) every chunk: ``kv`` in the input dtype
    ``[batch, kv_heads, chunks, d, d]``, ``k_sum`` fp32 ``[.., chunks, d]``; for non-causal attention the one state
    (or cotangent) of the whole sequence as a single chunk. Non-causal packed rows add the suffix states (or their
    cotangents) of every chunk, ``suffix_kv`` and ``suffix_sum``."""

    kv: jax.Array
    k_sum: jax.Array
    suffix_kv: jax.Array | None = None
    suffix_sum: jax.Array | None = None

    def arrays(self) -> tuple[jax.Array, ...]:
        return tuple(x for x in self if x is not None)


def _chunk_inputs(sp: _Specs, cfg: "_Config", chunks: _ChunkStates, names: tuple[str, ...]) -> dict:
    """Per-chunk states (or cotangents) as inputs of a chunk-parallel kernel, named ``names`` in field order."""
    specs = (sp.state_of_chunk(cfg.per_chunk), sp.sum_of_chunk(cfg.per_chunk)) * 2
    return {name: (spec, x) for name, spec, x in zip(names, specs, chunks.arrays())}


def _id_inputs(sp: _Specs, ids) -> dict:
    """The packed rows' (query ids, key ids), if any, as kernel inputs."""
    return {} if ids is None else {"qid_ref": (sp.ids(), ids[0]), "kid_ref": (sp.ids(), ids[1])}


def _forward(cfg: "_Config", q: QArray, k: KVArray, v: KVArray, kv0: StateKV, ksum0: StateSum, ids=None):
    """Output, final state, the normaliser den [batch, heads, seq] (fp32) and the ``_ChunkStates`` it used."""
    batch, seq_len, heads, d = q.shape
    kv, ksum, states = _states(cfg, k, v, kv0, ksum0, ids)
    if cfg.two_sided:
        suffix = _states(cfg, k, v, jnp.zeros_like(kv0), jnp.zeros_like(ksum0), ids, reverse=True)[2]
        states = states._replace(suffix_kv=suffix.kv, suffix_sum=suffix.k_sum)
    sp = _Specs(seq_len, d, heads // k.shape[2], by_kv=False)
    out, den = _call(
        _chunk_out_kernel, cfg, (batch, heads, pl.cdiv(seq_len, cfg.chunk)),
        {"q_ref": (sp.q(), q), "k_ref": (sp.kv(), k), "v_ref": (sp.kv(), v),
         **_chunk_inputs(sp, cfg, states, ("s_ref", "z_ref", "rs_ref", "rz_ref")), **_id_inputs(sp, ids)},
        {"o_ref": (sp.q(), out_struct(q.shape, q.dtype, q)),
         "den_ref": (sp.rows(), out_struct((batch, heads, seq_len), jnp.float32, q))},
        "linear_attention_chunk_out", d, seq_len=seq_len, causal=cfg.causal,
    )
    return out, kv, ksum, den, states


def _walk(cfg: "_Config", kernel, name: str, heads_per_kv: int, inputs, initial: dict, final: tuple[str, str],
          chunk_dtype, seq_len: int, like: Array, **kwargs):
    """Launches a state walk (``_state_kernel`` or ``_state_grad_kernel``) over (batch, kv_heads, value tiles):
    its final state and sum (fp32, named ``final`` in the kernel), and the ``_ChunkStates`` in ``chunk_dtype``: the
    kernel's per-chunk outputs if ``cfg.per_chunk``, else the final state itself as the one chunk. ``inputs`` maps a
    ``_Specs`` to the kernel's inputs (whose query-head arrays hold ``heads_per_kv`` heads per program), ``initial``
    names the walk's initial state and sum; ``kwargs`` go to the kernel."""
    (state_name, state0), (sum_name, sum0) = initial.items()
    batch, kv_heads, d = sum0.shape
    tile, num_chunks = min(d, cfg.tile), pl.cdiv(seq_len, cfg.chunk)
    sp = _Specs(seq_len, d, heads_per_kv, by_kv=True, tile=tile)
    outputs = {final[0]: (sp.state("cols"), out_struct(state0.shape, jnp.float32, like)),
               final[1]: (sp.state_sum(), out_struct(sum0.shape, jnp.float32, like))}
    if cfg.per_chunk:
        outputs.update(sp.chunk_outputs(batch, kv_heads, num_chunks, chunk_dtype, like))
    state, state_sum, *chunks = _call(
        kernel, cfg, (batch, kv_heads, d // tile),
        {**inputs(sp), state_name: (sp.state("cols"), state0), sum_name: (sp.state_sum(), sum0)}, outputs, name, d,
        seq_len=seq_len, **kwargs,
    )
    if cfg.per_chunk:
        return state, state_sum, _ChunkStates(*chunks)
    return state, state_sum, _ChunkStates(state[:, :, None].astype(chunk_dtype), state_sum[:, :, None])


def _states(cfg: "_Config", k: KVArray, v: KVArray, kv0: StateKV, ksum0: StateSum, ids=None, reverse: bool = False):
    """``_state_kernel``: the final state (fp32) and the ``_ChunkStates`` (per chunk if ``cfg.per_chunk``); with
    ``reverse`` (non-causal packed rows) the suffix states, from ``(kv0, ksum0)`` zero."""
    def inputs(sp):
        packed = {} if ids is None else {"kid_ref": (sp.ids(), ids[1])}
        return {"k_ref": (sp.kv(), k), "v_ref": (sp.kv(tiled=True), v), **packed}

    return _walk(cfg, _state_kernel, "linear_attention_states", 1, inputs, {"kv0_ref": kv0, "ksum0_ref": ksum0},
                 ("kv_ref", "ksum_ref"), k.dtype, k.shape[1], k, reverse=reverse)


def _state_grads(cfg: "_Config", q: QArray, do: QArray, den, r, dkv_final: StateKV, dksum_final: StateSum, ids=None,
                 reverse: bool = True):
    """``_state_grad_kernel``: the initial-state cotangent and the ``_ChunkStates`` of (U, w): after every chunk
    if ``cfg.per_chunk``, else the initial-state cotangent itself; with ``reverse=False`` (non-causal packed rows)
    the suffix states' cotangents, from zero ``(dkv_final, dksum_final)``."""
    group = q.shape[2] // dkv_final.shape[1]

    def inputs(sp):
        return {"q_ref": (sp.q(), q), "do_ref": (sp.q(tiled=True), do), "den_ref": (sp.rows(), den),
                "r_ref": (sp.rows(), r), **_id_inputs(sp, ids)}

    return _walk(cfg, _state_grad_kernel, "linear_attention_state_grads", group, inputs,
                 {"dkv_ref": dkv_final, "dksum_ref": dksum_final}, ("u_ref", "w_ref"), q.dtype, q.shape[1], q,
                 group=group, reverse=reverse)


def _chunk_dq(cfg: "_Config", q: QArray, k: KVArray, v: KVArray, do: QArray, out: QArray, den,
              states: _ChunkStates, ids=None) -> tuple[QArray, Float[Array, "batch heads seq"]]:
    """``_chunk_dq_kernel`` over all chunks of every head at once: dq and r."""
    batch, seq_len, heads, d = q.shape
    sp = _Specs(seq_len, d, heads // k.shape[2], by_kv=False)
    return _call(
        _chunk_dq_kernel, cfg, (batch, heads, pl.cdiv(seq_len, cfg.chunk)),
        {"q_ref": (sp.q(), q), "k_ref": (sp.kv(), k), "v_ref": (sp.kv(), v), "do_ref": (sp.q(), do),
         "out_ref": (sp.q(), out), "den_ref": (sp.rows(), den),
         **_chunk_inputs(sp, cfg, states, ("s_ref", "z_ref", "rs_ref", "rz_ref")), **_id_inputs(sp, ids)},
        {"dq_ref": (sp.q(), out_struct(q.shape, q.dtype, q)), "r_ref": (sp.rows(), out_struct(den.shape, jnp.float32, q))},
        "linear_attention_chunk_dq", d, seq_len=seq_len, causal=cfg.causal,
    )


def _chunk_dkdv(cfg: "_Config", q: QArray, k: KVArray, v: KVArray, do: QArray, den, r, grads: _ChunkStates,
                ids=None):
    """``_chunk_dkdv_kernel`` over all chunks of every KV head at once: (dk, dv)."""
    batch, seq_len, heads, d = q.shape
    kv_heads = k.shape[2]
    sp = _Specs(seq_len, d, heads // kv_heads, by_kv=True)
    return _call(
        _chunk_dkdv_kernel, cfg, (batch, kv_heads, pl.cdiv(seq_len, cfg.chunk)),
        {"q_ref": (sp.q(), q), "k_ref": (sp.kv(), k), "v_ref": (sp.kv(), v), "do_ref": (sp.q(), do),
         "den_ref": (sp.rows(), den), "r_ref": (sp.rows(), r),
         **_chunk_inputs(sp, cfg, grads, ("u_ref", "w_ref", "ru_ref", "rw_ref")), **_id_inputs(sp, ids)},
        {"dk_ref": (sp.kv(), out_struct(k.shape, k.dtype, q)), "dv_ref": (sp.kv(), out_struct(v.shape, v.dtype, q))},
        "linear_attention_chunk_dkdv", d, seq_len=seq_len, group=heads // kv_heads, causal=cfg.causal,
    )


def _backward(
    cfg: "_Config", q: QArray, k: KVArray, v: KVArray, out: QArray, den, states: _ChunkStates,
    do: QArray, dkv_final: StateKV, dksum_final: StateSum, ids=None,
) -> tuple[QArray, KVArray, KVArray, StateKV, StateSum]:
    """Cotangents of (q, k, v, initial kv, initial k_sum), reading the forward's ``states``."""
    dq, r = _chunk_dq(cfg, q, k, v, do, out, den, states, ids)
    dkv0, dksum0, grads = _state_grads(cfg, q, do, den, r, dkv_final, dksum_final, ids)
    if cfg.two_sided:
        suffix = _state_grads(cfg, q, do, den, r, jnp.zeros_like(dkv_final), jnp.zeros_like(dksum_final), ids,
                              reverse=False)[2]
        grads = grads._replace(suffix_kv=suffix.kv, suffix_sum=suffix.k_sum)
    dk, dv = _chunk_dkdv(cfg, q, k, v, do, den, r, grads, ids)
    return dq, dk, dv, dkv0, dksum0


def _state_layout(x) -> str:
    """Layout (``_partitioning``) of a state-like array: batch, KV heads, then whole dimensions."""
    return "bk" + "." * (x.ndim - 2)


def _sharded_forward(cfg: "_Config", q, k, v, kv0, ksum0, ids=None):
    """``_forward`` with its chunk states flattened, each device running its batch rows and heads under ``jit``."""
    ids = () if ids is None else tuple(ids)

    def kernel(q, k, v, kv0, ksum0, *ids):
        out, kv, ksum, den, states = _forward(cfg, q, k, v, kv0, ksum0, ids or None)
        return out, kv, ksum, den, *states.arrays()

    args = (q, k, v, kv0, ksum0, *ids)
    if not _partitioning.wanted():
        out, kv, ksum, den, *states = kernel(*args)
    else:
        shapes = jax.eval_shape(kernel, *args)
        out_layouts = ("b.h.", "bk..", "bk.", "bh.", *map(_state_layout, shapes[4:]))
        out, kv, ksum, den, *states = _partitioning.partitioned(
            kernel, ("b.h.", "b.k.", "b.k.", "bk..", "bk.", *("b." for _ in ids)), out_layouts,
            group=q.shape[2] // k.shape[2],
        )(*args)
    return out, kv, ksum, den, _ChunkStates(*states)


def _sharded_backward(cfg: "_Config", q, k, v, out, den, states: _ChunkStates, ids, do, dkv_final, dksum_final):
    """``_backward``, partitioned as ``_sharded_forward``."""
    states, ids = states.arrays(), () if ids is None else tuple(ids)
    n, m = len(states), len(ids)

    def kernel(q, k, v, out, den, *rest):
        chunks, packed, cotangents = rest[:n], rest[n:n + m], rest[n + m:]
        return _backward(cfg, q, k, v, out, den, _ChunkStates(*chunks), *cotangents, ids=packed or None)

    args = (q, k, v, out, den, *states, *ids, do, dkv_final, dksum_final)
    if not _partitioning.wanted():
        return kernel(*args)
    in_layouts = ("b.h.", "b.k.", "b.k.", "b.h.", "bh.", *map(_state_layout, states), *("b." for _ in ids), "b.h.",
                  "bk..", "bk.")
    return _partitioning.partitioned(
        kernel, in_layouts, ("b.h.", "b.k.", "b.k.", "bk..", "bk."), group=q.shape[2] // k.shape[2],
    )(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _linear_attention(
    cfg: "_Config", q: QArray, k: KVArray, v: KVArray, kv0: StateKV, ksum0: StateSum, ids
) -> tuple[QArray, StateKV, StateSum]:
    return _sharded_forward(cfg, q, k, v, kv0, ksum0, ids)[:3]


def _linear_attention_fwd(cfg: "_Config", q, k, v, kv0, ksum0, ids):
    reject_higher_order("linear_attention", q, k, v, kv0, ksum0)
    out, kv, ksum, den, states = _sharded_forward(cfg, q, k, v, kv0, ksum0, ids)
    # O(seq) residuals: the state before every chunk (input dtype) feeds the backward's dq directly.
    return (out, kv, ksum), (q, k, v, out, den, states, ids)


def _linear_attention_bwd(cfg: "_Config", residuals, cotangents):
    reject_higher_order("linear_attention", residuals, cotangents)
    *residuals, ids = residuals
    grads = _sharded_backward(cfg, *residuals, ids, *cotangents)
    return (*grads, None)  # integer ids: no cotangent


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


def _kernel_ids(
    segment_ids: Int[Array, "batch seq"] | None, query_lengths: Int[Array, " batch"] | None,
    kv_lengths: Int[Array, " batch"] | None, batch: int, seq_len: int,
) -> tuple[Int[Array, "batch seq"], Int[Array, "batch seq"]]:
    """Packed and padded rows as the kernels' one per-position input: int32 (query ids, key ids) ``[batch, seq]``.

    A segment (a run of equal ``segment_ids``; an id that comes back after another starts a new segment) has as id
    the position where it starts, -1 for the row's first segment; keys at or past ``kv_lengths`` get -2 and never
    start a segment; queries at or past ``query_lengths``, and those of a segment after the first that starts at or
    past ``kv_lengths`` (it has no key, and the first segment's queries read the initial state), get 2**30.
    """
    positions = jnp.arange(seq_len, dtype=jnp.int32)
    if segment_ids is None:
        starts = jnp.full((batch, seq_len), -1, jnp.int32)
    else:
        starts = segment_starts(jnp.asarray(segment_ids))
        starts = jnp.where(starts == 0, -1, starts)  # the first segment, which reads the initial state
    kv_len = seq_len if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32)[:, None]
    k_ids = jnp.where(positions < kv_len, starts, _KEY_PADDING)
    reads = starts < kv_len
    if query_lengths is not None:
        reads = reads & (positions < jnp.asarray(query_lengths, jnp.int32)[:, None])
    return jnp.where(reads, starts, _NO_QUERY).astype(jnp.int32), k_ids.astype(jnp.int32)


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
    segment_ids: Int[Array, "batch seq"] | None = None,
    query_lengths: Int[Array, " batch"] | None = None,
    kv_lengths: Int[Array, " batch"] | None = None,
) -> tuple[Float[Array, "batch seq heads head_dim"], LinearState]:
    """Linear attention with feature map ``phi`` in {"elu" (elu + 1), "relu", "softmax" (over head_dim)}.

    ``out_i = phi(q_i) @ S_i / (phi(q_i) . z_i + 1e-6)`` with ``S_i = S0 + sum_j phi(k_j) v_j^T`` and
    ``z_i = z0 + sum_j phi(k_j)``, summing over ``j <= i`` if ``causal`` else over the whole sequence; ``(S0, z0)``
    is ``initial_state`` (zeros if None). No softmax scale. Query head ``h`` uses KV head ``h // (heads //
    kv_heads)``. Returns the output in ``q.dtype`` and the float32 final state (sums over the whole sequence),
    which can itself be differentiated. ``chunk_size`` (a power of 2, at least 16) is the sequence tile of every
    kernel, forward and backward; by default the measured best (``_default_chunk``).

    Packed and padded rows (checked by ``pallas_kernels.linear_attention``): ``segment_ids [batch, seq]`` restrict
    the sums to ``j`` of query i's segment (a run of equal ids), ``(S0, z0)`` belonging to each row's first segment
    only; keys at or past ``kv_lengths [batch]`` count nowhere; queries at or past ``query_lengths [batch]`` output
    zeros. The final state is that of the segment of each row's last valid key.
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

    ids = None
    if not (segment_ids is None and query_lengths is None and kv_lengths is None):
        ids = _kernel_ids(segment_ids, query_lengths, kv_lengths, batch, seq_len)
    # Inside shard_map every input of the custom_vjp varies like the keys (a zero or replicated initial state then
    # gets a cotangent of its own type; the cast's transpose sums it).
    kv0, ksum0 = vary_like(kv0, k), vary_like(ksum0, k)
    if ids is not None:
        ids = jax.tree.map(lambda x: vary_like(x, k), ids)
    cfg = _Config(feature_map, bool(causal), chunk_size, interpret, _TILE, segmented=ids is not None)
    compute = _compute_dtype(q.dtype)
    out, kv, ksum = _linear_attention(cfg, q.astype(compute), k.astype(compute), v.astype(compute), kv0, ksum0, ids)
    return out.astype(q.dtype), LinearState(kv, ksum)


def _compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """The kernels' operand dtype: the input's, except float32 for float16. float16's range (65504) is too small
    for the ``phi(q) . phi(k)`` products and the per-chunk states (inputs of magnitude ~100, or a long sequence of
    positive values, overflowed to inf), so float16 runs the float32 kernels; bfloat16 has float32's range."""
    return jnp.dtype(jnp.float32) if dtype == jnp.float16 else jnp.dtype(dtype)
