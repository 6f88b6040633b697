"""Linear attention (Katharopoulos et al. 2020) as Pallas GPU kernels for the Triton lowering.

With ``a_i = phi(q_i)``, ``b_j = phi(k_j)`` and an initial state ``(S0, z0)``::

    out_i = a_i @ S_i / (a_i . z_i + 1e-6),   S_i = S0 + sum_j b_j v_j^T,   z_i = z0 + sum_j b_j

where the sums run over ``j <= i`` (causal) or over the whole sequence (non-causal). Query head ``h`` reads
KV head ``h // group``. The final state ``(S0 + sum_all b_j v_j^T, z0 + sum_all b_j)`` is returned per KV head.

Causal kernels walk the sequence chunk by chunk with (a head_dim tile of) the state in fp32 registers, one
program per (batch, head, tile); non-causal ones reduce the state first and then apply it to every query block
in parallel. Dots take operands in the input dtype (bf16/fp16 on the half-precision tensor cores, fp32 exact)
and accumulate in fp32; feature maps, sums, normalisers and the state stay fp32. The causal backward saves the
output and the per-query normaliser (O(seq)) besides the inputs and initial state, and replays the state chunk
by chunk; the non-causal one saves the inputs and the final state.
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

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
# 64 columns per program: (batch, heads, 2) programs at head_dim 128. Tests lower it to cover several tiles.
_TILE = 64


class _Config(NamedTuple):
    feature_map: str
    causal: bool
    chunk: int  # sequence rows per loop step of the kernel being launched
    interpret: bool
    tile: int  # head_dim tile of the causal kernels' third grid axis (capped at head_dim)
    chunk_bwd: int  # ``chunk`` of the backward kernels


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


def _normalise_grad(do, out, den):
    """For out = num / den[:, None]: (g, r) with d num = g and d den = r (fp32)."""
    g = do / den[:, None]
    r = -jnp.sum(do * out, axis=1) / den
    return g, r


# ----------------------------------------------------------------------------------------------------------------
# Causal kernels. The third grid axis tiles one head_dim axis of the state, so that each (batch, head) runs as
# d // tile programs: the value axis in the forward and dv kernels, the key axis in the dq and dk kernels (whole
# for the softmax feature map, which couples a row). Every program recomputes the full-width chunk matrices.


def _causal_fwd_kernel(
    q_ref, k_ref, v_ref, kv0_ref, ksum0_ref, o_ref, den_ref, kv_ref, ksum_ref, *, feature_map, seq_len, chunk,
    group,
):
    """Grid (batch, heads, value tiles). Walks the chunks in order, carrying the columns S[:, tile] of the head's
    KV head's state and the whole z; writes out[:, tile] and (tile 0) the normaliser den = a_i . z_i + eps."""
    d = q_ref.shape[-1]
    tile_v = v_ref.shape[-1]
    dot = functools.partial(_dot, dtype=q_ref.dtype)
    rows = jnp.arange(chunk)
    tril = rows[:, None] >= rows[None, :]
    first_tile = pl.program_id(2) == 0

    def body(c, carry):
        s, z = carry
        start = c * chunk
        valid = start + rows < seq_len
        tile = (pl.ds(start, chunk), slice(None))
        a = _phi(_load32(q_ref.at[tile], _row_mask(valid, d)), feature_map)
        _, b = _keys(k_ref.at[tile], _row_mask(valid, d), feature_map)
        v = _load(v_ref.at[tile], _row_mask(valid, tile_v))
        att = jnp.where(tril, dot(a, b, trans_b=True), 0.0)
        num = dot(att, v) + dot(a, s)
        den = jnp.sum(att, axis=1) + jnp.sum(a * z[None, :], axis=1) + _EPS
        plgpu.store(o_ref.at[tile], (num / den[:, None]).astype(o_ref.dtype), mask=_row_mask(valid, tile_v))
        plgpu.store(den_ref.at[pl.ds(start, chunk)], den, mask=valid & first_tile)
        return s + dot(b, v, trans_a=True), z + jnp.sum(b, axis=0)

    s, z = lax.fori_loop(0, pl.cdiv(seq_len, chunk), body, (kv0_ref[...], ksum0_ref[...]))

    # Every query head of a group carries the same state; the first one writes it.
    first_head = lax.rem(pl.program_id(1), group) == 0

    @pl.when(first_head)
    def _():
        kv_ref[...] = s

    @pl.when(first_head & first_tile)
    def _():
        ksum_ref[...] = z


def _causal_dq_kernel(
    q_ref, k_ref, v_ref, do_ref, o_ref, den_ref, kv0_ref, ksum0_ref, dq_ref, r_ref, *, feature_map, seq_len, chunk,
):
    """Grid (batch, heads, key tiles). Walks the chunks in order carrying the rows S[tile, :] and z[tile]; writes
    dq[:, tile] and (tile 0) r = d loss / d den per query, from the saved output and normaliser."""
    d = v_ref.shape[-1]
    tile_k = q_ref.shape[-1]
    dot = functools.partial(_dot, dtype=q_ref.dtype)
    rows = jnp.arange(chunk)
    tril = rows[:, None] >= rows[None, :]
    first_tile = pl.program_id(2) == 0

    def body(c, carry):
        s, z = carry
        start = c * chunk
        valid = start + rows < seq_len
        mask_k, mask_d = _row_mask(valid, tile_k), _row_mask(valid, d)
        tile = (pl.ds(start, chunk), slice(None))
        x = _load32(q_ref.at[tile], mask_k)
        _, b = _keys(k_ref.at[tile], mask_k, feature_map)
        v = _load(v_ref.at[tile], mask_d)
        den = _load(den_ref.at[pl.ds(start, chunk)], valid, other=1.0)
        # Padded queries have do = 0, hence g = 0 and r = 0.
        g, r = _normalise_grad(_load32(do_ref.at[tile], mask_d), _load32(o_ref.at[tile], mask_d), den)
        # d a_i = S_i g_i + r_i z_i with the inclusive prefix state S_i = s + sum_{j<=i in chunk} b_j v_j^T.
        m = jnp.where(tril, dot(g, v, trans_b=True) + r[:, None], 0.0)
        da = dot(g, s, trans_b=True) + r[:, None] * z[None, :] + dot(m, b)
        plgpu.store(dq_ref.at[tile], _phi_vjp(x, da, feature_map).astype(dq_ref.dtype), mask=mask_k)
        plgpu.store(r_ref.at[pl.ds(start, chunk)], r, mask=valid & first_tile)
        return s + dot(b, v, trans_a=True), z + jnp.sum(b, axis=0)

    lax.fori_loop(0, pl.cdiv(seq_len, chunk), body, (kv0_ref[...], ksum0_ref[...]))


def _causal_dk_kernel(
    q_ref, k_ref, v_ref, do_ref, den_ref, r_ref, dkv_ref, dksum_ref, dk_ref, dkv0_ref, dksum0_ref, *,
    feature_map, seq_len, chunk, group,
):
    """Grid (batch, kv_heads, key tiles). Walks the chunks in reverse, carrying the rows U[tile, :] and w[tile] of
    the state cotangent summed over the group's query heads (initialised with the final-state cotangent); writes
    dk[:, tile] and ends with the rows of the initial-state cotangent."""
    d = v_ref.shape[-1]
    tile_k = k_ref.shape[-1]
    dot = functools.partial(_dot, dtype=q_ref.dtype)
    rows = jnp.arange(chunk)
    tril = rows[:, None] >= rows[None, :]
    num_chunks = pl.cdiv(seq_len, chunk)

    def body(i, carry):
        start = (num_chunks - 1 - i) * chunk
        valid = start + rows < seq_len
        mask_k, mask_d = _row_mask(valid, tile_k), _row_mask(valid, d)
        tile = (pl.ds(start, chunk), slice(None))
        y, _ = _keys(k_ref.at[tile], mask_k, feature_map)
        v = _load(v_ref.at[tile], mask_d)
        u, w = carry
        # Queries of later chunks (and the final state) reach these keys through (U, w) alone.
        db = dot(v, u, trans_b=True) + w[None, :]

        def head(h, acc):
            db, u, w = acc
            q_tile = (pl.ds(start, chunk), h, slice(None))
            a = _phi(_load32(q_ref.at[q_tile], mask_k), feature_map)
            den = _load(den_ref.at[h, pl.ds(start, chunk)], valid, other=1.0)
            r = _load(r_ref.at[h, pl.ds(start, chunk)], valid)
            # Padded queries have do = 0 and r = 0, so they contribute nothing.
            g = _load32(do_ref.at[q_tile], mask_d) / den[:, None]
            m = jnp.where(tril, dot(g, v, trans_b=True) + r[:, None], 0.0)
            return db + dot(m, a, trans_a=True), u + dot(a, g, trans_a=True), w + jnp.sum(r[:, None] * a, axis=0)

        db, u, w = lax.fori_loop(0, group, head, (db, u, w))
        plgpu.store(dk_ref.at[tile], _phi_vjp(y, db, feature_map).astype(dk_ref.dtype), mask=mask_k)
        return u, w

    u, w = lax.fori_loop(0, num_chunks, body, (dkv_ref[...], dksum_ref[...]))
    dkv0_ref[...] = u
    dksum0_ref[...] = w


def _causal_dv_kernel(q_ref, k_ref, do_ref, den_ref, dkv_ref, dv_ref, *, feature_map, seq_len, chunk, group):
    """Grid (batch, kv_heads, value tiles). Walks the chunks in reverse, carrying the columns U[:, tile] of the
    state cotangent summed over the group's query heads; writes dv[:, tile] = b U[:, tile] + sum_h att_h^T g_h."""
    d = k_ref.shape[-1]
    tile_v = do_ref.shape[-1]
    dot = functools.partial(_dot, dtype=q_ref.dtype)
    rows = jnp.arange(chunk)
    tril = rows[:, None] >= rows[None, :]
    num_chunks = pl.cdiv(seq_len, chunk)

    def body(i, u):
        start = (num_chunks - 1 - i) * chunk
        valid = start + rows < seq_len
        mask_d, mask_v = _row_mask(valid, d), _row_mask(valid, tile_v)
        tile = (pl.ds(start, chunk), slice(None))
        _, b = _keys(k_ref.at[tile], mask_d, feature_map)
        dv = dot(b, u)

        def head(h, acc):
            dv, u = acc
            q_tile = (pl.ds(start, chunk), h, slice(None))
            a = _phi(_load32(q_ref.at[q_tile], mask_d), feature_map)
            den = _load(den_ref.at[h, pl.ds(start, chunk)], valid, other=1.0)
            g = _load32(do_ref.at[q_tile], mask_v) / den[:, None]
            att = jnp.where(tril, dot(a, b, trans_b=True), 0.0)
            return dv + dot(att, g, trans_a=True), u + dot(a, g, trans_a=True)

        dv, u = lax.fori_loop(0, group, head, (dv, u))
        plgpu.store(dv_ref.at[tile], dv.astype(dv_ref.dtype), mask=mask_v)
        return u

    lax.fori_loop(0, num_chunks, body, dkv_ref[...])


# ----------------------------------------------------------------------------------------------------------------
# Non-causal kernels.


def _state_kernel(k_ref, v_ref, kv0_ref, ksum0_ref, kv_ref, ksum_ref, *, feature_map, seq_len, chunk):
    """Grid (batch, kv_heads). S = S0 + sum_j b_j v_j^T and z = z0 + sum_j b_j over the whole sequence."""
    d = k_ref.shape[-1]
    dot = functools.partial(_dot, dtype=k_ref.dtype)
    rows = jnp.arange(chunk)

    def body(c, carry):
        s, z = carry
        start = c * chunk
        mask = _row_mask(start + rows < seq_len, d)
        tile = (pl.ds(start, chunk), slice(None))
        _, b = _keys(k_ref.at[tile], mask, feature_map)
        v = _load(v_ref.at[tile], mask)
        return s + dot(b, v, trans_a=True), z + jnp.sum(b, axis=0)

    s, z = lax.fori_loop(0, pl.cdiv(seq_len, chunk), body, (kv0_ref[...], ksum0_ref[...]))
    kv_ref[...] = s
    ksum_ref[...] = z


def _apply_kernel(q_ref, kv_ref, ksum_ref, o_ref, *, feature_map, seq_len, chunk):
    """Grid (batch, heads, query blocks). out = a @ S / (a . z + eps)."""
    d = q_ref.shape[-1]
    start = pl.program_id(2) * chunk
    mask = _row_mask(start + jnp.arange(chunk) < seq_len, d)
    tile = (pl.ds(start, chunk), slice(None))
    a = _phi(_load32(q_ref.at[tile], mask), feature_map)
    num = _dot(a, kv_ref[...], q_ref.dtype)
    den = jnp.sum(a * ksum_ref[...][None, :], axis=1) + _EPS
    plgpu.store(o_ref.at[tile], (num / den[:, None]).astype(o_ref.dtype), mask=mask)


def _dq_kernel(q_ref, do_ref, kv_ref, ksum_ref, dq_ref, den_ref, r_ref, *, feature_map, seq_len, chunk):
    """Grid (batch, heads, query blocks). dq, plus the normaliser and r = d loss / d normaliser per query."""
    d = q_ref.shape[-1]
    dot = functools.partial(_dot, dtype=q_ref.dtype)
    start = pl.program_id(2) * chunk
    valid = start + jnp.arange(chunk) < seq_len
    mask = _row_mask(valid, d)
    tile = (pl.ds(start, chunk), slice(None))
    x = _load32(q_ref.at[tile], mask)
    a = _phi(x, feature_map)
    do = _load32(do_ref.at[tile], mask)
    s = kv_ref[...]
    z = ksum_ref[...]
    den = jnp.sum(a * z[None, :], axis=1) + _EPS
    g, r = _normalise_grad(do, dot(a, s) / den[:, None], den)
    da = dot(g, s, trans_b=True) + r[:, None] * z[None, :]
    plgpu.store(dq_ref.at[tile], _phi_vjp(x, da, feature_map).astype(dq_ref.dtype), mask=mask)
    plgpu.store(den_ref.at[pl.ds(start, chunk)], den, mask=valid)
    plgpu.store(r_ref.at[pl.ds(start, chunk)], r, mask=valid)


def _state_grad_kernel(
    q_ref, do_ref, den_ref, r_ref, dkv_ref, dksum_ref, u_ref, w_ref, *, feature_map, seq_len, chunk, group,
):
    """Grid (batch, kv_heads). State cotangent U = dS_final + sum_{h in group, i} a_i g_i^T and
    w = dz_final + sum_{h, i} r_i a_i: the cotangent of both the initial state and of every key's (b_j, v_j)."""
    d = q_ref.shape[-1]
    dot = functools.partial(_dot, dtype=q_ref.dtype)
    rows = jnp.arange(chunk)

    def body(c, carry):
        start = c * chunk
        valid = start + rows < seq_len
        mask = _row_mask(valid, d)

        def head(h, acc):
            u, w = acc
            q_tile = (pl.ds(start, chunk), h, slice(None))
            a = _phi(_load32(q_ref.at[q_tile], mask), feature_map)
            do = _load32(do_ref.at[q_tile], mask)
            den = _load(den_ref.at[h, pl.ds(start, chunk)], valid, other=1.0)
            r = _load(r_ref.at[h, pl.ds(start, chunk)], valid)
            u = u + dot(a, do / den[:, None], trans_a=True)
            return u, w + jnp.sum(r[:, None] * a, axis=0)

        return lax.fori_loop(0, group, head, carry)

    u, w = lax.fori_loop(0, pl.cdiv(seq_len, chunk), body, (dkv_ref[...], dksum_ref[...]))
    u_ref[...] = u
    w_ref[...] = w


def _dkv_kernel(k_ref, v_ref, u_ref, w_ref, dk_ref, dv_ref, *, feature_map, seq_len, chunk):
    """Grid (batch, kv_heads, key blocks). d b_j = U v_j + w and dv_j = U^T b_j."""
    d = k_ref.shape[-1]
    dot = functools.partial(_dot, dtype=k_ref.dtype)
    start = pl.program_id(2) * chunk
    mask = _row_mask(start + jnp.arange(chunk) < seq_len, d)
    tile = (pl.ds(start, chunk), slice(None))
    y, b = _keys(k_ref.at[tile], mask, feature_map)
    v = _load(v_ref.at[tile], mask)
    u = u_ref[...]
    db = dot(v, u, trans_b=True) + w_ref[...][None, :]
    plgpu.store(dk_ref.at[tile], _phi_vjp(y, db, feature_map).astype(dk_ref.dtype), mask=mask)
    plgpu.store(dv_ref.at[tile], dot(b, u).astype(dv_ref.dtype), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# pallas_call wrappers.


class _Specs:
    """BlockSpecs for a grid whose first two axes are (batch, head axis); ``by_kv`` if that axis is KV heads.

    The sequence axis is one whole-length window that the kernels index with power-of-2 ``pl.ds`` tiles. With
    ``tiled=True`` a spec takes the ``tile`` columns (or, for ``state``, rows or columns) numbered by the third
    grid axis, which must then be the head_dim tile.
    """

    def __init__(self, seq_len: int, d: int, group: int, by_kv: bool, tile: int | None = None):
        self.seq_len, self.d, self.group, self.by_kv, self.tile = seq_len, d, group, by_kv, tile

    def _kv_head(self, h):
        return h if self.by_kv else lax.div(h, self.group)

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

    def state(self, tiled: Literal["rows", "cols"] | None = None) -> pl.BlockSpec:
        """[batch, kv_heads, d, d]."""
        if tiled == "rows":
            return pl.BlockSpec((None, None, self.tile, self.d), lambda b, h, j: (b, self._kv_head(h), j, 0))
        if tiled == "cols":
            return pl.BlockSpec((None, None, self.d, self.tile), lambda b, h, j: (b, self._kv_head(h), 0, j))
        return pl.BlockSpec((None, None, self.d, self.d), lambda b, h, *_: (b, self._kv_head(h), 0, 0))

    def state_sum(self, tiled: bool = False) -> pl.BlockSpec:
        """[batch, kv_heads, d]."""
        if tiled:
            return pl.BlockSpec((None, None, self.tile), lambda b, h, j: (b, self._kv_head(h), j))
        return pl.BlockSpec((None, None, self.d), lambda b, h, *_: (b, self._kv_head(h), 0))


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


def _tiles(cfg: _Config, d: int) -> tuple[int, int]:
    """(key tile, value tile) of the causal kernels' head_dim grid axis."""
    tile = min(d, cfg.tile)
    # The softmax feature map normalises over the whole key row.
    return (d if cfg.feature_map == "softmax" else tile), tile


def _forward(cfg: _Config, q: QArray, k: KVArray, v: KVArray, kv0: StateKV, ksum0: StateSum):
    """Output, final state and (causal; None otherwise) the normaliser [batch, heads, seq] in fp32."""
    batch, seq_len, heads, d = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    state_shapes = [jax.ShapeDtypeStruct(kv0.shape, jnp.float32), jax.ShapeDtypeStruct(ksum0.shape, jnp.float32)]
    if cfg.causal:
        _, tile_v = _tiles(cfg, d)
        sp = _Specs(seq_len, d, group, by_kv=False, tile=tile_v)
        out, den, kv, ksum = _call(
            _causal_fwd_kernel, cfg, (batch, heads, d // tile_v),
            [sp.q(), sp.kv(), sp.kv(tiled=True), sp.state("cols"), sp.state_sum()],
            [sp.q(tiled=True), sp.rows(), sp.state("cols"), sp.state_sum()],
            [
                jax.ShapeDtypeStruct(q.shape, q.dtype),
                jax.ShapeDtypeStruct((batch, heads, seq_len), jnp.float32),
                *state_shapes,
            ],
            "linear_attention_causal_fwd", d, seq_len=seq_len, group=group,
        )(q, k, v, kv0, ksum0)
        return out, kv, ksum, den
    spk = _Specs(seq_len, d, group, by_kv=True)
    kv, ksum = _call(
        _state_kernel, cfg, (batch, kv_heads),
        [spk.kv(), spk.kv(), spk.state(), spk.state_sum()],
        [spk.state(), spk.state_sum()],
        state_shapes,
        "linear_attention_state", d, seq_len=seq_len,
    )(k, v, kv0, ksum0)
    sp = _Specs(seq_len, d, group, by_kv=False)
    out = _call(
        _apply_kernel, cfg, (batch, heads, pl.cdiv(seq_len, cfg.chunk)),
        [sp.q(), sp.state(), sp.state_sum()],
        sp.q(),
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        "linear_attention_apply", d, seq_len=seq_len,
    )(q, kv, ksum)
    return out, kv, ksum, None


def _causal_backward(
    cfg: _Config, q: QArray, k: KVArray, v: KVArray, out: QArray, den, kv0: StateKV, ksum0: StateSum, do: QArray,
    dkv_final: StateKV, dksum_final: StateSum,
) -> tuple[QArray, KVArray, KVArray, StateKV, StateSum]:
    """Cotangents of (q, k, v, initial kv, initial k_sum) from the inputs, output, normaliser and initial state."""
    batch, seq_len, heads, d = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    tile_k, tile_v = _tiles(cfg, d)
    common = dict(seq_len=seq_len)
    sp = _Specs(seq_len, d, group, by_kv=False, tile=tile_k)
    dq, r = _call(
        _causal_dq_kernel, cfg, (batch, heads, d // tile_k),
        [sp.q(tiled=True), sp.kv(tiled=True), sp.kv(), sp.q(), sp.q(), sp.rows(), sp.state("rows"),
         sp.state_sum(tiled=True)],
        [sp.q(tiled=True), sp.rows()],
        [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(den.shape, jnp.float32)],
        "linear_attention_causal_dq", d, **common,
    )(q, k, v, do, out, den, kv0, ksum0)
    spk = _Specs(seq_len, d, group, by_kv=True, tile=tile_k)
    dk, dkv0, dksum0 = _call(
        _causal_dk_kernel, cfg, (batch, kv_heads, d // tile_k),
        [spk.q(tiled=True), spk.kv(tiled=True), spk.kv(), spk.q(), spk.rows(), spk.rows(), spk.state("rows"),
         spk.state_sum(tiled=True)],
        [spk.kv(tiled=True), spk.state("rows"), spk.state_sum(tiled=True)],
        [
            jax.ShapeDtypeStruct(k.shape, k.dtype),
            jax.ShapeDtypeStruct(kv0.shape, jnp.float32),
            jax.ShapeDtypeStruct(ksum0.shape, jnp.float32),
        ],
        "linear_attention_causal_dk", d, group=group, **common,
    )(q, k, v, do, den, r, dkv_final, dksum_final)
    spv = _Specs(seq_len, d, group, by_kv=True, tile=tile_v)
    dv = _call(
        _causal_dv_kernel, cfg, (batch, kv_heads, d // tile_v),
        [spv.q(), spv.kv(), spv.q(tiled=True), spv.rows(), spv.state("cols")],
        spv.kv(tiled=True),
        jax.ShapeDtypeStruct(v.shape, v.dtype),
        "linear_attention_causal_dv", d, group=group, **common,
    )(q, k, do, den, dkv_final)
    return dq, dk, dv, dkv0, dksum0


def _noncausal_backward(
    cfg: _Config, q: QArray, k: KVArray, v: KVArray, kv: StateKV, ksum: StateSum, do: QArray,
    dkv_final: StateKV, dksum_final: StateSum,
) -> tuple[QArray, KVArray, KVArray, StateKV, StateSum]:
    """Cotangents of (q, k, v, initial kv, initial k_sum) from the inputs and the final state."""
    batch, seq_len, heads, d = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    common = dict(seq_len=seq_len)
    sp = _Specs(seq_len, d, group, by_kv=False)
    spk = _Specs(seq_len, d, group, by_kv=True)
    rows_shape = jax.ShapeDtypeStruct((batch, heads, seq_len), jnp.float32)
    blocks = pl.cdiv(seq_len, cfg.chunk)
    dq, den, r = _call(
        _dq_kernel, cfg, (batch, heads, blocks),
        [sp.q(), sp.q(), sp.state(), sp.state_sum()],
        [sp.q(), sp.rows(), sp.rows()],
        [jax.ShapeDtypeStruct(q.shape, q.dtype), rows_shape, rows_shape],
        "linear_attention_dq", d, **common,
    )(q, do, kv, ksum)
    u, w = _call(
        _state_grad_kernel, cfg, (batch, kv_heads),
        [spk.q(), spk.q(), spk.rows(), spk.rows(), spk.state(), spk.state_sum()],
        [spk.state(), spk.state_sum()],
        [jax.ShapeDtypeStruct(kv.shape, jnp.float32), jax.ShapeDtypeStruct(ksum.shape, jnp.float32)],
        "linear_attention_state_grad", d, group=group, **common,
    )(q, do, den, r, dkv_final, dksum_final)
    dk, dv = _call(
        _dkv_kernel, cfg, (batch, kv_heads, blocks),
        [spk.kv(), spk.kv(), spk.state(), spk.state_sum()],
        [spk.kv(), spk.kv()],
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        "linear_attention_dkv", d, **common,
    )(k, v, u, w)
    return dq, dk, dv, u, w


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _linear_attention(
    cfg: _Config, q: QArray, k: KVArray, v: KVArray, kv0: StateKV, ksum0: StateSum
) -> tuple[QArray, StateKV, StateSum]:
    return _forward(cfg, q, k, v, kv0, ksum0)[:3]


def _linear_attention_fwd(cfg: _Config, q, k, v, kv0, ksum0):
    out, kv, ksum, den = _forward(cfg, q, k, v, kv0, ksum0)
    # Causal backward replays the state from the initial one and reads the output and normaliser (all O(seq));
    # non-causal needs only the final state.
    residuals = (q, k, v, out, den, kv0, ksum0) if cfg.causal else (q, k, v, kv, ksum)
    return (out, kv, ksum), residuals


def _linear_attention_bwd(cfg: _Config, residuals, cotangents):
    cfg = cfg._replace(chunk=cfg.chunk_bwd)
    backward = _causal_backward if cfg.causal else _noncausal_backward
    return backward(cfg, *residuals, *cotangents)


_linear_attention.defvjp(_linear_attention_fwd, _linear_attention_bwd)


def _default_chunks(seq_len: int, d: int, itemsize: int) -> tuple[int, int]:
    """(forward, backward) sequence chunk.

    Forward: 64 rows, capped so a tile stays within 16 KiB (fp32 [64, 128] tiles overflow shared memory).
    Backward: 128 rows for 2-byte inputs up to head_dim 128. Measured on an H200 (bf16, d128, S=32768,
    BENCHMARKS.md): forward 3.46 ms at chunk 64 vs 3.96 at 128, backward 10.3 ms at chunk 128 vs 11.9 at 64.
    Triton dots need >= 16 rows.
    """
    cap = pl.next_power_of_2(seq_len)
    forward = max(16, min(64, 16384 // (d * itemsize), cap))
    backward = max(16, min(128, cap)) if itemsize == 2 and d <= 128 else forward
    return forward, backward


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
    kernel; by default the forward and the backward each take their measured best (``_default_chunks``).
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
        chunk, chunk_bwd = _default_chunks(seq_len, d, q.dtype.itemsize)
    elif chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of 2 of at least 16, got {chunk_size}")
    else:
        chunk = chunk_bwd = chunk_size

    if initial_state is None:
        kv0 = jnp.zeros((batch, kv_heads, d, d), jnp.float32)
        ksum0 = jnp.zeros((batch, kv_heads, d), jnp.float32)
    else:
        kv0 = initial_state.kv.astype(jnp.float32)
        ksum0 = initial_state.k_sum.astype(jnp.float32)
        if kv0.shape != (batch, kv_heads, d, d) or ksum0.shape != (batch, kv_heads, d):
            raise ValueError(f"initial_state shapes {kv0.shape}, {ksum0.shape} do not match k {k.shape}")

    cfg = _Config(feature_map, bool(causal), chunk, interpret, _TILE, chunk_bwd)
    out, kv, ksum = _linear_attention(cfg, q, k, v, kv0, ksum0)
    return out, LinearState(kv, ksum)
