"""Linear attention (Katharopoulos et al. 2020) as Pallas GPU kernels for the Triton lowering.

With ``a_i = phi(q_i)``, ``b_j = phi(k_j)`` and an initial state ``(S0, z0)``::

    out_i = a_i @ S_i / (a_i . z_i + 1e-6),   S_i = S0 + sum_j b_j v_j^T,   z_i = z0 + sum_j b_j

where the sums run over ``j <= i`` (causal) or over the whole sequence (non-causal). Query head ``h`` reads
KV head ``h // group``. The final state ``(S0 + sum_all b_j v_j^T, z0 + sum_all b_j)`` is returned per KV head.

Causal kernels walk the sequence chunk by chunk with the state in fp32 registers; non-causal ones reduce the
state first and then apply it to every query block in parallel. The backward pass recomputes the forward
chunk by chunk, so only the inputs (and, non-causal, the final state) are saved.
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


class _Config(NamedTuple):
    feature_map: str
    causal: bool
    chunk: int
    interpret: bool


# ----------------------------------------------------------------------------------------------------------------
# In-kernel helpers. All of them work on fp32 tiles of shape [chunk, head_dim].


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


def _row_mask(valid: jax.Array, width: int) -> jax.Array:
    return jnp.broadcast_to(valid[:, None], (valid.shape[0], width))


def _load(ref, mask: jax.Array, other: float = 0.0) -> jax.Array:
    return plgpu.load(ref, mask=mask, other=other).astype(jnp.float32)


def _keys(k_ref, mask: jax.Array, feature_map: str) -> tuple[jax.Array, jax.Array]:
    """Loads a key tile; returns it (fp32) and phi of it with rows past the sequence zeroed."""
    y = _load(k_ref, mask)
    # phi(0) != 0 for elu and softmax: padded keys must be zeroed after the feature map.
    return y, jnp.where(mask, _phi(y, feature_map), 0.0)


def _normalise_grad(do, num, den):
    """For out = num / den[:, None]: (g, r) with d num = g and d den = r."""
    g = do / den[:, None]
    r = -jnp.sum(do * num, axis=1) / (den * den)
    return g, r


# ----------------------------------------------------------------------------------------------------------------
# Causal kernels.


def _causal_fwd_kernel(
    q_ref, k_ref, v_ref, kv0_ref, ksum0_ref, o_ref, kv_ref, ksum_ref, *, feature_map, seq_len, chunk, group,
    precision,
):
    """Grid (batch, heads). Walks the chunks in order, carrying (S, z) of the head's KV head."""
    d = q_ref.shape[-1]
    dot = functools.partial(plgpu.dot, precision=precision)
    rows = jnp.arange(chunk)
    tril = rows[:, None] >= rows[None, :]

    def body(c, carry):
        s, z = carry
        start = c * chunk
        mask = _row_mask(start + rows < seq_len, d)
        tile = (pl.ds(start, chunk), slice(None))
        a = _phi(_load(q_ref.at[tile], mask), feature_map)
        _, b = _keys(k_ref.at[tile], mask, feature_map)
        v = _load(v_ref.at[tile], mask)
        att = jnp.where(tril, dot(a, b, trans_b=True), 0.0)
        num = dot(att, v) + dot(a, s)
        den = jnp.sum(att, axis=1) + jnp.sum(a * z[None, :], axis=1) + _EPS
        plgpu.store(o_ref.at[tile], (num / den[:, None]).astype(o_ref.dtype), mask=mask)
        return s + dot(b, v, trans_a=True), z + jnp.sum(b, axis=0)

    s, z = lax.fori_loop(0, pl.cdiv(seq_len, chunk), body, (kv0_ref[...], ksum0_ref[...]))

    # Every query head of a group carries the same state; the first one writes it.
    @pl.when(lax.rem(pl.program_id(1), group) == 0)
    def _():
        kv_ref[...] = s
        ksum_ref[...] = z


def _causal_dq_kernel(
    q_ref, k_ref, v_ref, do_ref, kv0_ref, ksum0_ref, dq_ref, den_ref, r_ref, *, feature_map, seq_len, chunk,
    precision,
):
    """Grid (batch, heads). Recomputes the forward chunk by chunk and writes dq, the normaliser and
    r = d loss / d normaliser per query (the latter two feed the dk/dv kernel)."""
    d = q_ref.shape[-1]
    dot = functools.partial(plgpu.dot, precision=precision)
    rows = jnp.arange(chunk)
    tril = rows[:, None] >= rows[None, :]

    def body(c, carry):
        s, z = carry
        start = c * chunk
        valid = start + rows < seq_len
        mask = _row_mask(valid, d)
        tile = (pl.ds(start, chunk), slice(None))
        x = _load(q_ref.at[tile], mask)
        a = _phi(x, feature_map)
        _, b = _keys(k_ref.at[tile], mask, feature_map)
        v = _load(v_ref.at[tile], mask)
        do = _load(do_ref.at[tile], mask)
        att = jnp.where(tril, dot(a, b, trans_b=True), 0.0)
        num = dot(att, v) + dot(a, s)
        den = jnp.sum(att, axis=1) + jnp.sum(a * z[None, :], axis=1) + _EPS
        g, r = _normalise_grad(do, num, den)
        # d a_i = S_i g_i + r_i z_i with the inclusive prefix state S_i = s + sum_{j<=i in chunk} b_j v_j^T.
        m = jnp.where(tril, dot(g, v, trans_b=True) + r[:, None], 0.0)
        da = dot(g, s, trans_b=True) + r[:, None] * z[None, :] + dot(m, b)
        plgpu.store(dq_ref.at[tile], _phi_vjp(x, da, feature_map).astype(dq_ref.dtype), mask=mask)
        plgpu.store(den_ref.at[pl.ds(start, chunk)], den, mask=valid)
        plgpu.store(r_ref.at[pl.ds(start, chunk)], r, mask=valid)
        return s + dot(b, v, trans_a=True), z + jnp.sum(b, axis=0)

    lax.fori_loop(0, pl.cdiv(seq_len, chunk), body, (kv0_ref[...], ksum0_ref[...]))


def _causal_dkv_kernel(
    q_ref, k_ref, v_ref, do_ref, den_ref, r_ref, dkv_ref, dksum_ref, dk_ref, dv_ref, dkv0_ref, dksum0_ref, *,
    feature_map, seq_len, chunk, group, precision,
):
    """Grid (batch, kv_heads). Walks the chunks in reverse, carrying the state cotangent (U, w) summed over the
    group's query heads (initialised with the final-state cotangent); ends with the initial-state cotangent."""
    d = k_ref.shape[-1]
    dot = functools.partial(plgpu.dot, precision=precision)
    rows = jnp.arange(chunk)
    tril = rows[:, None] >= rows[None, :]
    num_chunks = pl.cdiv(seq_len, chunk)

    def body(i, carry):
        u, w = carry
        start = (num_chunks - 1 - i) * chunk
        valid = start + rows < seq_len
        mask = _row_mask(valid, d)
        tile = (pl.ds(start, chunk), slice(None))
        y, b = _keys(k_ref.at[tile], mask, feature_map)
        v = _load(v_ref.at[tile], mask)
        # Queries of later chunks (and the final state) reach these keys through (U, w) alone.
        db = dot(v, u, trans_b=True) + w[None, :]
        dv = dot(b, u)

        def head(h, acc):
            db, dv, u, w = acc
            q_tile = (pl.ds(start, chunk), h, slice(None))
            a = _phi(_load(q_ref.at[q_tile], mask), feature_map)
            # Padded queries have do = 0 and r = 0, so they contribute nothing.
            do = _load(do_ref.at[q_tile], mask)
            den = _load(den_ref.at[h, pl.ds(start, chunk)], valid, other=1.0)
            r = _load(r_ref.at[h, pl.ds(start, chunk)], valid)
            g = do / den[:, None]
            att = jnp.where(tril, dot(a, b, trans_b=True), 0.0)
            m = jnp.where(tril, dot(g, v, trans_b=True) + r[:, None], 0.0)
            return (
                db + dot(m, a, trans_a=True),
                dv + dot(att, g, trans_a=True),
                u + dot(a, g, trans_a=True),
                w + jnp.sum(r[:, None] * a, axis=0),
            )

        db, dv, u, w = lax.fori_loop(0, group, head, (db, dv, u, w))
        plgpu.store(dk_ref.at[tile], _phi_vjp(y, db, feature_map).astype(dk_ref.dtype), mask=mask)
        plgpu.store(dv_ref.at[tile], dv.astype(dv_ref.dtype), mask=mask)
        return u, w

    u, w = lax.fori_loop(0, num_chunks, body, (dkv_ref[...], dksum_ref[...]))
    dkv0_ref[...] = u
    dksum0_ref[...] = w


# ----------------------------------------------------------------------------------------------------------------
# Non-causal kernels.


def _state_kernel(k_ref, v_ref, kv0_ref, ksum0_ref, kv_ref, ksum_ref, *, feature_map, seq_len, chunk, precision):
    """Grid (batch, kv_heads). S = S0 + sum_j b_j v_j^T and z = z0 + sum_j b_j over the whole sequence."""
    d = k_ref.shape[-1]
    rows = jnp.arange(chunk)

    def body(c, carry):
        s, z = carry
        start = c * chunk
        mask = _row_mask(start + rows < seq_len, d)
        tile = (pl.ds(start, chunk), slice(None))
        _, b = _keys(k_ref.at[tile], mask, feature_map)
        v = _load(v_ref.at[tile], mask)
        return s + plgpu.dot(b, v, trans_a=True, precision=precision), z + jnp.sum(b, axis=0)

    s, z = lax.fori_loop(0, pl.cdiv(seq_len, chunk), body, (kv0_ref[...], ksum0_ref[...]))
    kv_ref[...] = s
    ksum_ref[...] = z


def _apply_kernel(q_ref, kv_ref, ksum_ref, o_ref, *, feature_map, seq_len, chunk, precision):
    """Grid (batch, heads, query blocks). out = a @ S / (a . z + eps)."""
    d = q_ref.shape[-1]
    start = pl.program_id(2) * chunk
    mask = _row_mask(start + jnp.arange(chunk) < seq_len, d)
    tile = (pl.ds(start, chunk), slice(None))
    a = _phi(_load(q_ref.at[tile], mask), feature_map)
    num = plgpu.dot(a, kv_ref[...], precision=precision)
    den = jnp.sum(a * ksum_ref[...][None, :], axis=1) + _EPS
    plgpu.store(o_ref.at[tile], (num / den[:, None]).astype(o_ref.dtype), mask=mask)


def _dq_kernel(q_ref, do_ref, kv_ref, ksum_ref, dq_ref, den_ref, r_ref, *, feature_map, seq_len, chunk, precision):
    """Grid (batch, heads, query blocks). dq, plus the normaliser and r = d loss / d normaliser per query."""
    d = q_ref.shape[-1]
    start = pl.program_id(2) * chunk
    valid = start + jnp.arange(chunk) < seq_len
    mask = _row_mask(valid, d)
    tile = (pl.ds(start, chunk), slice(None))
    x = _load(q_ref.at[tile], mask)
    a = _phi(x, feature_map)
    do = _load(do_ref.at[tile], mask)
    s = kv_ref[...]
    z = ksum_ref[...]
    num = plgpu.dot(a, s, precision=precision)
    den = jnp.sum(a * z[None, :], axis=1) + _EPS
    g, r = _normalise_grad(do, num, den)
    da = plgpu.dot(g, s, trans_b=True, precision=precision) + r[:, None] * z[None, :]
    plgpu.store(dq_ref.at[tile], _phi_vjp(x, da, feature_map).astype(dq_ref.dtype), mask=mask)
    plgpu.store(den_ref.at[pl.ds(start, chunk)], den, mask=valid)
    plgpu.store(r_ref.at[pl.ds(start, chunk)], r, mask=valid)


def _state_grad_kernel(
    q_ref, do_ref, den_ref, r_ref, dkv_ref, dksum_ref, u_ref, w_ref, *, feature_map, seq_len, chunk, group,
    precision,
):
    """Grid (batch, kv_heads). State cotangent U = dS_final + sum_{h in group, i} a_i g_i^T and
    w = dz_final + sum_{h, i} r_i a_i: the cotangent of both the initial state and of every key's (b_j, v_j)."""
    d = q_ref.shape[-1]
    rows = jnp.arange(chunk)

    def body(c, carry):
        start = c * chunk
        valid = start + rows < seq_len
        mask = _row_mask(valid, d)

        def head(h, acc):
            u, w = acc
            q_tile = (pl.ds(start, chunk), h, slice(None))
            a = _phi(_load(q_ref.at[q_tile], mask), feature_map)
            do = _load(do_ref.at[q_tile], mask)
            den = _load(den_ref.at[h, pl.ds(start, chunk)], valid, other=1.0)
            r = _load(r_ref.at[h, pl.ds(start, chunk)], valid)
            u = u + plgpu.dot(a, do / den[:, None], trans_a=True, precision=precision)
            return u, w + jnp.sum(r[:, None] * a, axis=0)

        return lax.fori_loop(0, group, head, carry)

    u, w = lax.fori_loop(0, pl.cdiv(seq_len, chunk), body, (dkv_ref[...], dksum_ref[...]))
    u_ref[...] = u
    w_ref[...] = w


def _dkv_kernel(k_ref, v_ref, u_ref, w_ref, dk_ref, dv_ref, *, feature_map, seq_len, chunk, precision):
    """Grid (batch, kv_heads, key blocks). d b_j = U v_j + w and dv_j = U^T b_j."""
    d = k_ref.shape[-1]
    start = pl.program_id(2) * chunk
    mask = _row_mask(start + jnp.arange(chunk) < seq_len, d)
    tile = (pl.ds(start, chunk), slice(None))
    y, b = _keys(k_ref.at[tile], mask, feature_map)
    v = _load(v_ref.at[tile], mask)
    u = u_ref[...]
    db = plgpu.dot(v, u, trans_b=True, precision=precision) + w_ref[...][None, :]
    plgpu.store(dk_ref.at[tile], _phi_vjp(y, db, feature_map).astype(dk_ref.dtype), mask=mask)
    plgpu.store(dv_ref.at[tile], plgpu.dot(b, u, precision=precision).astype(dv_ref.dtype), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# pallas_call wrappers.


class _Specs:
    """BlockSpecs for a grid whose first two axes are (batch, head axis); ``by_kv`` if that axis is KV heads.

    The sequence axis is one whole-length window that the kernels index with power-of-2 ``pl.ds`` tiles.
    """

    def __init__(self, seq_len: int, d: int, group: int, by_kv: bool):
        self.seq_len, self.d, self.group, self.by_kv = seq_len, d, group, by_kv

    def _kv_head(self, h):
        return h if self.by_kv else lax.div(h, self.group)

    def q(self) -> pl.BlockSpec:
        """[batch, seq, heads, d]: one head, or the whole group when the grid runs over KV heads."""
        if self.by_kv:
            return pl.BlockSpec((None, self.seq_len, self.group, self.d), lambda b, h, *_: (b, 0, h, 0))
        return pl.BlockSpec((None, self.seq_len, None, self.d), lambda b, h, *_: (b, 0, h, 0))

    def kv(self) -> pl.BlockSpec:
        """[batch, seq, kv_heads, d]."""
        return pl.BlockSpec((None, self.seq_len, None, self.d), lambda b, h, *_: (b, 0, self._kv_head(h), 0))

    def rows(self) -> pl.BlockSpec:
        """[batch, heads, seq] per-query scalars."""
        if self.by_kv:
            return pl.BlockSpec((None, self.group, self.seq_len), lambda b, h, *_: (b, h, 0))
        return pl.BlockSpec((None, None, self.seq_len), lambda b, h, *_: (b, h, 0))

    def state(self) -> pl.BlockSpec:
        """[batch, kv_heads, d, d]."""
        return pl.BlockSpec((None, None, self.d, self.d), lambda b, h, *_: (b, self._kv_head(h), 0, 0))

    def state_sum(self) -> pl.BlockSpec:
        """[batch, kv_heads, d]."""
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


def _precision(dtype) -> lax.Precision:
    # fp32 inputs get exact fp32 products; half inputs fp32 operands at TF32 (fp32 range: the running state can
    # exceed fp16's, so it is never cast down).
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def _forward(
    cfg: _Config, q: QArray, k: KVArray, v: KVArray, kv0: StateKV, ksum0: StateSum
) -> tuple[QArray, StateKV, StateSum]:
    """Output and final state."""
    batch, seq_len, heads, d = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    common = dict(seq_len=seq_len, precision=_precision(q.dtype))
    state_shapes = [jax.ShapeDtypeStruct(kv0.shape, jnp.float32), jax.ShapeDtypeStruct(ksum0.shape, jnp.float32)]
    if cfg.causal:
        sp = _Specs(seq_len, d, group, by_kv=False)
        return _call(
            _causal_fwd_kernel, cfg, (batch, heads),
            [sp.q(), sp.kv(), sp.kv(), sp.state(), sp.state_sum()],
            [sp.q(), sp.state(), sp.state_sum()],
            [jax.ShapeDtypeStruct(q.shape, q.dtype), *state_shapes],
            "linear_attention_causal_fwd", d, group=group, **common,
        )(q, k, v, kv0, ksum0)
    spk = _Specs(seq_len, d, group, by_kv=True)
    kv, ksum = _call(
        _state_kernel, cfg, (batch, kv_heads),
        [spk.kv(), spk.kv(), spk.state(), spk.state_sum()],
        [spk.state(), spk.state_sum()],
        state_shapes,
        "linear_attention_state", d, **common,
    )(k, v, kv0, ksum0)
    sp = _Specs(seq_len, d, group, by_kv=False)
    out = _call(
        _apply_kernel, cfg, (batch, heads, pl.cdiv(seq_len, cfg.chunk)),
        [sp.q(), sp.state(), sp.state_sum()],
        sp.q(),
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        "linear_attention_apply", d, **common,
    )(q, kv, ksum)
    return out, kv, ksum


def _backward(
    cfg: _Config, q: QArray, k: KVArray, v: KVArray, kv: StateKV, ksum: StateSum, do: QArray,
    dkv_final: StateKV, dksum_final: StateSum,
) -> tuple[QArray, KVArray, KVArray, StateKV, StateSum]:
    """Cotangents of (q, k, v, initial kv, initial k_sum). (kv, ksum) is the initial state when causal and the
    final state otherwise."""
    batch, seq_len, heads, d = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    common = dict(seq_len=seq_len, precision=_precision(q.dtype))
    sp = _Specs(seq_len, d, group, by_kv=False)
    spk = _Specs(seq_len, d, group, by_kv=True)
    rows_shape = jax.ShapeDtypeStruct((batch, heads, seq_len), jnp.float32)
    dq_shapes = [jax.ShapeDtypeStruct(q.shape, q.dtype), rows_shape, rows_shape]
    state_shapes = [jax.ShapeDtypeStruct(kv.shape, jnp.float32), jax.ShapeDtypeStruct(ksum.shape, jnp.float32)]
    dkv_shapes = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    if cfg.causal:
        dq, den, r = _call(
            _causal_dq_kernel, cfg, (batch, heads),
            [sp.q(), sp.kv(), sp.kv(), sp.q(), sp.state(), sp.state_sum()],
            [sp.q(), sp.rows(), sp.rows()],
            dq_shapes,
            "linear_attention_causal_dq", d, **common,
        )(q, k, v, do, kv, ksum)
        dk, dv, dkv0, dksum0 = _call(
            _causal_dkv_kernel, cfg, (batch, kv_heads),
            [spk.q(), spk.kv(), spk.kv(), spk.q(), spk.rows(), spk.rows(), spk.state(), spk.state_sum()],
            [spk.kv(), spk.kv(), spk.state(), spk.state_sum()],
            [*dkv_shapes, *state_shapes],
            "linear_attention_causal_dkv", d, group=group, **common,
        )(q, k, v, do, den, r, dkv_final, dksum_final)
        return dq, dk, dv, dkv0, dksum0
    blocks = pl.cdiv(seq_len, cfg.chunk)
    dq, den, r = _call(
        _dq_kernel, cfg, (batch, heads, blocks),
        [sp.q(), sp.q(), sp.state(), sp.state_sum()],
        [sp.q(), sp.rows(), sp.rows()],
        dq_shapes,
        "linear_attention_dq", d, **common,
    )(q, do, kv, ksum)
    u, w = _call(
        _state_grad_kernel, cfg, (batch, kv_heads),
        [spk.q(), spk.q(), spk.rows(), spk.rows(), spk.state(), spk.state_sum()],
        [spk.state(), spk.state_sum()],
        state_shapes,
        "linear_attention_state_grad", d, group=group, **common,
    )(q, do, den, r, dkv_final, dksum_final)
    dk, dv = _call(
        _dkv_kernel, cfg, (batch, kv_heads, blocks),
        [spk.kv(), spk.kv(), spk.state(), spk.state_sum()],
        [spk.kv(), spk.kv()],
        dkv_shapes,
        "linear_attention_dkv", d, **common,
    )(k, v, u, w)
    return dq, dk, dv, u, w


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _linear_attention(
    cfg: _Config, q: QArray, k: KVArray, v: KVArray, kv0: StateKV, ksum0: StateSum
) -> tuple[QArray, StateKV, StateSum]:
    return _forward(cfg, q, k, v, kv0, ksum0)


def _linear_attention_fwd(cfg: _Config, q, k, v, kv0, ksum0):
    out, kv, ksum = _forward(cfg, q, k, v, kv0, ksum0)
    # Causal backward replays the state from the initial one; non-causal needs only the final one.
    state = (kv0, ksum0) if cfg.causal else (kv, ksum)
    return (out, kv, ksum), (q, k, v, *state)


def _linear_attention_bwd(cfg: _Config, residuals, cotangents):
    return _backward(cfg, *residuals, *cotangents)


_linear_attention.defvjp(_linear_attention_fwd, _linear_attention_bwd)


def _default_chunk(seq_len: int, d: int, itemsize: int) -> int:
    # 64 rows measured fastest on an H100 for bf16 at head_dim 64 and 128 (vs 32 and 128); fp32 [64, 128] tiles
    # overflow shared memory in the causal backward, so tiles are capped at 16 KiB. Triton dots need >= 16.
    return max(16, min(64, 16384 // (d * itemsize), pl.next_power_of_2(seq_len)))


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
    which can itself be differentiated. ``chunk_size`` (a power of 2, at least 16) is the sequence tile.
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
    chunk = _default_chunk(seq_len, d, q.dtype.itemsize) if chunk_size is None else chunk_size
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"chunk_size must be a power of 2 of at least 16, got {chunk}")

    if initial_state is None:
        kv0 = jnp.zeros((batch, kv_heads, d, d), jnp.float32)
        ksum0 = jnp.zeros((batch, kv_heads, d), jnp.float32)
    else:
        kv0 = initial_state.kv.astype(jnp.float32)
        ksum0 = initial_state.k_sum.astype(jnp.float32)
        if kv0.shape != (batch, kv_heads, d, d) or ksum0.shape != (batch, kv_heads, d):
            raise ValueError(f"initial_state shapes {kv0.shape}, {ksum0.shape} do not match k {k.shape}")

    cfg = _Config(feature_map, bool(causal), chunk, interpret)
    out, kv, ksum = _linear_attention(cfg, q, k, v, kv0, ksum0)
    return out, LinearState(kv, ksum)
