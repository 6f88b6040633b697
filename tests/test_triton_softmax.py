"""Interpret-mode tests of the Triton softmax-attention kernels against a float64 reference."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels._softmax_kernels import softmax_attention
from pallas_kernels._triton.softmax import KernelConfig, _Static, _visible, default_config
from pallas_kernels.block_ranges import kv_block_range, q_block_range

BLOCK16 = KernelConfig(16, 16, 16, 16, num_warps=4, num_stages=1, num_warps_bwd=4, num_stages_bwd=1)


def reference(q, k, v, windows, causal, softmax_scale):
    """Naive attention with an explicit mask, in the inputs' precision (call under x64 with float64 inputs)."""
    q_len, heads = q.shape[1], q.shape[2]
    kv_len, kv_heads = k.shape[1], k.shape[2]
    k = jnp.repeat(k, heads // kv_heads, axis=2)
    v = jnp.repeat(v, heads // kv_heads, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * softmax_scale
    d = (jnp.arange(q_len)[:, None] + kv_len - q_len) - jnp.arange(kv_len)[None, :]
    w = jnp.array([np.inf if x is None else x for x in windows], s.dtype)[:, None, None]
    visible = (d < w) & ((d >= 0) if causal else (d > -w))
    s = jnp.where(visible, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(visible, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def _inputs(seed, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (batch, kv_len, kv_heads, head_dim), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (batch, kv_len, kv_heads, head_dim), jnp.float32).astype(dtype)
    do = jax.random.normal(keys[3], (batch, q_len, heads, head_dim), jnp.float32).astype(dtype)
    return q, k, v, do


def _reference_vjp(q, k, v, do, windows, causal, softmax_scale):
    """Float64 output and (dq, dk, dv), as numpy arrays."""
    with jax.enable_x64(True):
        args = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)]
        out, vjp = jax.vjp(lambda *a: reference(*a, windows, causal, softmax_scale), *args)
        grads = vjp(jnp.asarray(np.asarray(do, np.float64)))
        return np.asarray(out), [np.asarray(g) for g in grads]


def _check(q, k, v, do, *, windows, causal, softmax_scale, config=BLOCK16, rtol=1e-4, atol=1e-4):
    def attn(q, k, v):
        return softmax_attention(
            q, k, v, windows=windows, causal=causal, softmax_scale=softmax_scale, interpret=True, config=config
        )

    out, vjp = jax.vjp(attn, q, k, v)
    grads = vjp(do)
    ref_out, ref_grads = _reference_vjp(q, k, v, do, windows, causal, softmax_scale)

    assert out.dtype == q.dtype and out.shape == q.shape
    for name, actual, expected, like in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads), (q, q, k, v)):
        assert actual.dtype == like.dtype and actual.shape == like.shape, name
        actual = np.asarray(actual, np.float64)
        assert not np.isnan(actual).any(), name
        scale = max(1.0, np.abs(expected).max())
        np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * scale, err_msg=name)


# (batch, q_len, kv_len, heads, kv_heads, head_dim, windows, causal)
CASES = {
    "causal_mha_full": (2, 33, 33, 1, 1, 16, (None,), True),
    "causal_gqa2_windows_around_block": (1, 50, 50, 2, 1, 32, (5, 40), True),
    "causal_gqa4_multiscale": (1, 40, 40, 4, 1, 16, (1, 16, None, 23), True),
    "causal_decode_alignment": (1, 5, 70, 4, 2, 16, (None, 9, 30, 2), True),
    "causal_ragged_q_shorter": (2, 17, 45, 2, 2, 16, (16, None), True),
    "bidir_gqa4_mixed_padded_head_dim": (1, 20, 37, 4, 1, 24, (None, 3, 17, 64), False),
    "bidir_gqa2_ragged": (1, 29, 29, 2, 1, 16, (7, None), False),
    # Non-causal with q_len > kv_len: early query rows see no key and must output (and backpropagate) zeros.
    "bidir_empty_rows": (1, 40, 20, 2, 2, 16, (3, None), False),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_float64_reference(case):
    batch, q_len, kv_len, heads, kv_heads, head_dim, windows, causal = case
    q, k, v, do = _inputs(0, batch, q_len, kv_len, heads, kv_heads, head_dim, jnp.float32)
    _check(q, k, v, do, windows=windows, causal=causal, softmax_scale=head_dim**-0.5)


def test_bfloat16():
    q, k, v, do = _inputs(1, 1, 37, 37, 4, 2, 32, jnp.bfloat16)
    _check(q, k, v, do, windows=(None, 12, 20, 3), causal=True, softmax_scale=0.2, rtol=2e-2, atol=2e-2)


def test_mixed_block_shapes_and_default_config():
    q, k, v, do = _inputs(2, 1, 45, 45, 2, 1, 16, jnp.float32)
    skewed = dataclasses.replace(BLOCK16, block_k=32, block_q_bwd=32)
    _check(q, k, v, do, windows=(None, 20), causal=True, softmax_scale=0.25, config=skewed)
    _check(q, k, v, do, windows=(None, 20), causal=False, softmax_scale=0.25, config=None)


def test_vmap_and_jit():
    q, k, v, _ = _inputs(3, 2, 24, 24, 2, 1, 16, jnp.float32)
    windows, stacked = (None, 6), (q[None], k[None], v[None])
    stacked = tuple(jnp.concatenate([x, 2 * x]) for x in stacked)  # a leading vmapped axis of size 2

    @jax.jit
    def attn(q, k, v):
        return softmax_attention(
            q, k, v, windows=windows, causal=True, softmax_scale=0.3, interpret=True, config=BLOCK16
        )

    out = jax.vmap(attn)(*stacked)
    for i in range(2):
        expected, _ = _reference_vjp(*(x[i] for x in stacked), stacked[0][i], windows, True, 0.3)
        np.testing.assert_allclose(np.asarray(out[i]), expected, rtol=1e-4, atol=1e-4)


def test_default_config_table():
    long = default_config(4096, 4096, 128, jnp.bfloat16)
    assert (long.block_q, long.block_k, long.block_q_bwd, long.block_k_bwd) == (128, 64, 64, 64)
    assert default_config(4096, 4096, 128, jnp.bfloat16, unlimited=True).block_k == 128
    assert default_config(4096, 4096, 128, jnp.float32, unlimited=True).block_k == 64
    assert default_config(4096, 4096, 256, jnp.bfloat16).block_q == 128
    assert default_config(4096, 4096, 64, jnp.bfloat16).block_q == 64
    short = default_config(5, 40, 96, jnp.float32)
    assert short.block_q == short.block_q_bwd == 16 and short.block_k <= 64
    with pytest.raises(ValueError):
        dataclasses.replace(BLOCK16, block_k=24)


def test_input_validation():
    q, k, v, _ = _inputs(4, 1, 20, 16, 2, 1, 16, jnp.float32)
    kwargs = dict(softmax_scale=1.0, interpret=True, config=BLOCK16)
    with pytest.raises(ValueError, match="q_len <= kv_len"):
        softmax_attention(q, k, v, windows=(None, None), causal=True, **kwargs)
    with pytest.raises(ValueError, match="window"):
        softmax_attention(q, k, v, windows=(None,), causal=False, **kwargs)
    with pytest.raises(ValueError, match="window"):
        softmax_attention(q, k, v, windows=(0, None), causal=False, **kwargs)


@pytest.mark.parametrize("causal", [True, False])
def test_block_ranges_are_tight(causal):
    """Loop bounds cover exactly the blocks holding a visible element; the unmasked range exactly the all-visible,
    in-bounds ones (so a window of W costs O(S * W) blocks)."""
    block = 16
    for q_len, kv_len in [(50, 50), (5, 70), (33, 61)] + ([] if causal else [(40, 20)]):
        st = _Static(q_len=q_len, kv_len=kv_len, head_dim=16, causal=causal, softmax_scale=1.0)
        n_qb, n_kb = -(-q_len // block), -(-kv_len // block)
        for window in (1, 5, 16, 23, 2**30):
            w = jnp.int32(window)
            q_pos = np.arange(q_len) + st.offset
            # Padded rows/keys count as invisible, so a block reaching past an edge is never "all visible".
            vis = np.zeros((n_qb * block, n_kb * block), bool)
            vis[:q_len, :kv_len] = _visible(q_pos[:, None], np.arange(kv_len)[None, :], w, causal, kv_len)
            tiles = vis.reshape(n_qb, block, n_kb, block).transpose(0, 2, 1, 3)

            def assert_range(rng, tiles_of_program, where):
                lo, full_lo, full_hi, hi = (int(x) for x in rng)
                assert list(range(lo, hi)) == list(np.flatnonzero(tiles_of_program.any(axis=(1, 2)))), where
                assert list(range(full_lo, full_hi)) == list(np.flatnonzero(tiles_of_program.all(axis=(1, 2)))), where

            for qb in range(n_qb):  # forward and dQ: the query block's real rows against every key block
                r_last = min(qb * block + block, q_len) - 1
                rng = kv_block_range(qb * block + st.offset, r_last + st.offset, w, st, block)
                assert_range(rng, tiles[qb, :, : r_last - qb * block + 1], (q_len, kv_len, window, qb))

            for kb in range(n_kb):  # dK/dV: the key block's real keys against every query block
                j_last = min(kb * block + block, kv_len) - 1
                rng = q_block_range(kb * block, j_last, w, st, block)
                assert_range(rng, tiles[:, kb, :, : j_last - kb * block + 1], (q_len, kv_len, window, kb))
