"""The Mosaic GPU softmax kernels on a Hopper GPU, against the float32 XLA path and the Triton kernels.

Marked ``gpu``: skipped where JAX has no CUDA device; each test also skips where the Mosaic kernels do not serve the
device or the installed JAX (``pallas_kernels._mosaic.softmax.SUPPORTED_JAX``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels as pk
from pallas_kernels._mosaic import softmax as mosaic
from pallas_kernels.masks import WindowMask
from tests.conftest import relerr

pytestmark = pytest.mark.gpu


def _skip_unless_served(q, k, mask=None):
    reason = mosaic.unsupported_reason(q, k, mask or WindowMask((None,) * q.shape[2]))
    if reason is not None:
        pytest.skip(reason)


def qkv(b, sq, skv, h, kvh, d, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(keys[0], (b, sq, h, d), dtype), jax.random.normal(keys[1], (b, skv, kvh, d), dtype),
            jax.random.normal(keys[2], (b, skv, kvh, d), dtype), jax.random.normal(keys[3], (b, sq, h, d)))


CASES = {
    # name: (batch, q_len, kv_len, heads, kv_heads, head_dim, dtype, window_size or per-head windows, causal)
    "causal_gqa4_d128": (2, 1024, 1024, 8, 2, 128, jnp.bfloat16, None, True),
    "full_mha_d64_fp16": (1, 1000, 1000, 4, 4, 64, jnp.float16, None, False),
    "causal_ragged_gqa2": (1, 1999, 1999, 4, 2, 128, jnp.bfloat16, None, True),
    "window_below_tile": (1, 777, 777, 4, 1, 128, jnp.bfloat16, 50, True),
    "window_above_tile_full": (1, 555, 555, 4, 2, 64, jnp.bfloat16, 300, False),
    "multiscale_mixed_windows": (1, 1300, 1300, 8, 4, 128, jnp.bfloat16, (32, 64, 200, 1000, None, None, 129, 64), True),
    "short_queries": (1, 100, 777, 4, 2, 128, jnp.float16, 300, True),
    "long_queries_full": (1, 300, 200, 4, 2, 64, jnp.bfloat16, None, False),
}


def _op(window, causal):
    if isinstance(window, tuple):
        return lambda q, k, v, **o: pk.multiscale_attention(q, k, v, window, causal=causal, **o)
    return lambda q, k, v, **o: pk.flash_attention(q, k, v, causal=causal, window_size=window, **o)


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_gradients_against_xla_and_triton(case):
    b, sq, skv, h, kvh, d, dtype, window, causal = CASES[case]
    q, k, v, ct = qkv(b, sq, skv, h, kvh, d, dtype)
    _skip_unless_served(q, k)
    op = _op(window, causal)
    loss = lambda *a, **o: jnp.sum(op(*a, **o).astype(jnp.float32) * ct)
    grad = lambda **o: jax.jit(jax.grad(functools.partial(loss, **o), argnums=(0, 1, 2)))
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]

    out = jax.jit(functools.partial(op, implementation="pallas_mosaic"))(q, k, v)
    assert out.dtype == dtype
    assert relerr(out, op(*f32, implementation="xla")) < 1e-2
    assert relerr(out, op(q, k, v, implementation="pallas_triton")) < 1e-2
    got = grad(implementation="pallas_mosaic")(q, k, v)
    want = grad(implementation="xla")(*f32)
    triton = grad(implementation="pallas_triton")(q, k, v)
    for g, w, t in zip(got, want, triton):
        assert g.dtype == dtype
        assert relerr(g, w) < 2e-2
        assert relerr(g, t) < 2e-2


PACKED = {
    # name: (heads, kv_heads, head_dim, dtype, window or per-head windows, causal); documents of 300, 77, 600 and 523
    # tokens in row 0 (S=1500), one document with its last 400 tokens padding in row 1.
    "causal_gqa4_d128": (8, 2, 128, jnp.bfloat16, None, True),
    "window_gqa2_fp16": (4, 2, 128, jnp.float16, 200, True),
    "full_mha_d64": (4, 4, 64, jnp.bfloat16, None, False),
    "multiscale_mixed": (8, 4, 128, jnp.bfloat16, (32, 300, None, None, 129, 64, None, 1000), True),
}


@pytest.mark.parametrize("case", list(PACKED))
def test_segment_ids_and_lengths_against_xla_and_triton(case):
    """Packed documents and padded rows run on the Mosaic kernels (``"auto"`` picks them) and match the float32 XLA
    path and the Triton kernels: output and all gradients."""
    h, kvh, d, dtype, window, causal = PACKED[case]
    q, k, v, ct = qkv(2, 1500, 1500, h, kvh, d, dtype, seed=3)
    _skip_unless_served(q, k)
    ids = jnp.asarray([[0] * 300 + [1] * 77 + [2] * 600 + [3] * 523, [5] * 1500], jnp.int32)
    options = dict(q_segment_ids=ids, query_seq_lengths=jnp.asarray([1500, 1100]),
                   key_value_seq_lengths=jnp.asarray([1500, 1100]))
    op = functools.partial(_op(window, causal), **options)
    loss = lambda *a, **o: jnp.sum(op(*a, **o).astype(jnp.float32) * ct)
    grad = lambda **o: jax.jit(jax.grad(functools.partial(loss, **o), argnums=(0, 1, 2)))
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]

    out = jax.jit(functools.partial(op, implementation="pallas_mosaic"))(q, k, v)
    want = op(*f32, implementation="xla")
    assert relerr(out, want) < 1e-2
    assert relerr(out, op(q, k, v, implementation="pallas_triton")) < 1e-2
    assert not jnp.any(out[1, 1100:])  # padding rows are zeros
    got = grad(implementation="pallas_mosaic")(q, k, v)
    for g, w, t in zip(got, grad(implementation="xla")(*f32), grad(implementation="pallas_triton")(q, k, v)):
        assert relerr(g, w) < 2e-2
        assert relerr(g, t) < 2e-2


def test_pallas_and_auto_pick_mosaic_on_hopper():
    q, k, v, _ = qkv(1, 256, 256, 4, 2, 128, jnp.bfloat16)
    _skip_unless_served(q, k)
    text = jax.jit(lambda *a: pk.flash_attention(*a, implementation="auto")).lower(q, k, v).as_text()
    assert "mosaic_gpu" in text.lower()
    mosaic_out = pk.flash_attention(q, k, v, implementation="pallas")
    assert relerr(mosaic_out, pk.flash_attention(q, k, v, implementation="pallas_mosaic")) == 0.0


def test_head_dim_256_forward_mosaic_backward_triton():
    q, k, v, ct = qkv(1, 640, 640, 4, 2, 256, jnp.bfloat16)
    _skip_unless_served(q, k)
    loss = lambda *a, **o: jnp.sum(pk.flash_attention(*a, **o).astype(jnp.float32) * ct)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    assert relerr(pk.flash_attention(q, k, v, implementation="pallas_mosaic"),
                  pk.flash_attention(*f32, implementation="xla")) < 1e-2
    got = jax.grad(functools.partial(loss, implementation="pallas_mosaic"), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(functools.partial(loss, implementation="xla"), argnums=(0, 1, 2))(*f32)
    for g, w in zip(got, want):
        assert relerr(g, w) < 2e-2


def test_no_nan_for_large_finite_inputs_and_fully_masked_rows():
    q, k, v, _ = qkv(1, 300, 200, 4, 2, 128, jnp.bfloat16)
    _skip_unless_served(q, k)
    # Queries before position -W see no key (non-causal, q_len > kv_len): zeros, never NaN.
    out = pk.flash_attention(q * 8, k * 8, v, causal=False, window_size=20, implementation="pallas_mosaic")
    want = pk.flash_attention(*(x.astype(jnp.float32) for x in (q * 8, k * 8, v)), causal=False, window_size=20,
                              implementation="xla")
    assert relerr(out, want) < 1e-2
    assert not jnp.any(out[:, :100 - 19])
