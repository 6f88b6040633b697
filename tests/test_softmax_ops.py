"""Softmax-attention ops (flash, window, multi-scale, sparse, decode) against float64 naive references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import pallas_kernels as pk
from tests import naive
from tests.conftest import relerr, x64

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def qkv(rng, b, sq, sk, h, kvh, d, dtype=jnp.float32):
    make = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
    return make(b, sq, h, d), make(b, sk, kvh, d), make(b, sk, kvh, d)


def run_or_skip(fn):
    try:
        return fn()
    except NotImplementedError as e:
        pytest.skip(f"no Pallas kernel yet: {e}")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("window", [None, 1, 5, 40])
def test_flash_and_window_match_naive(impl, rng, causal, heads, kv_heads, window):
    q, k, v = qkv(rng, 2, 19, 19, heads, kv_heads, 16)
    out = run_or_skip(lambda: pk.flash_attention(q, k, v, causal=causal, window_size=window, **impl))
    want = naive.softmax_attention(q, k, v, naive.window_mask(19, 19, [window] * heads, causal))
    assert out.shape == q.shape and out.dtype == q.dtype
    assert relerr(out, want) < TOL[jnp.float32]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_queries_shorter_than_keys_are_the_last_positions(impl, rng, dtype):
    q, k, v = qkv(rng, 1, 7, 23, 4, 2, 16, dtype)
    out = run_or_skip(lambda: pk.flash_attention(q, k, v, window_size=9, **impl))
    want = naive.softmax_attention(q, k, v, naive.window_mask(7, 23, [9] * 4, True))
    assert out.dtype == dtype
    assert relerr(out, want) < TOL[dtype]


@pytest.mark.parametrize("causal", [True, False])
def test_multiscale_mixes_per_head_windows(impl, rng, causal):
    windows = (2, 7, None, 3)
    q, k, v = qkv(rng, 2, 21, 21, 4, 2, 16)
    out = run_or_skip(lambda: pk.multiscale_attention(q, k, v, windows, causal=causal, **impl))
    want = naive.softmax_attention(q, k, v, naive.window_mask(21, 21, windows, causal))
    assert relerr(out, want) < TOL[jnp.float32]


def test_softmax_scale_is_used(impl, rng):
    q, k, v = qkv(rng, 1, 9, 9, 2, 2, 16)
    out = run_or_skip(lambda: pk.flash_attention(q, k, v, softmax_scale=0.3, **impl))
    want = naive.softmax_attention(q, k, v, naive.window_mask(9, 9, [None] * 2, True), scale=0.3)
    assert relerr(out, want) < TOL[jnp.float32]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("block_size,num_global", [(4, 1), (4, 6), (8, 0)])
def test_sparse_matches_dense_masked_reference(impl, rng, causal, block_size, num_global):
    config = dict(block_size=block_size, num_global_tokens=num_global, num_local_blocks=2,
                  num_random_blocks=2, seed=3, causal=causal)
    q, k, v = qkv(rng, 2, 37, 37, 4, 2, 16)
    out = run_or_skip(lambda: pk.sparse_attention(q, k, v, **config, **impl))
    mask = pk.sparse_mask(37, 4, **config)
    assert relerr(out, naive.softmax_attention(q, k, v, mask)) < TOL[jnp.float32]


@pytest.mark.parametrize("window", [None, 3, (None, 2, 5, 1)])
def test_decode_against_a_cache_with_per_row_lengths(impl, rng, window):
    capacity, t = 24, 3
    q, k, v = qkv(rng, 3, t, capacity, 4, 2, 16)
    lengths = jnp.array([3, 17, 24])
    out = run_or_skip(lambda: pk.decode_attention(q, k, v, lengths, window, **impl))
    windows = list(window) if isinstance(window, tuple) else [window] * 4
    for row, length in enumerate(np.asarray(lengths)):
        mask = naive.window_mask(t, int(length), windows, True)
        want = naive.softmax_attention(q[row:row + 1], k[row:row + 1, :length], v[row:row + 1, :length], mask)
        assert relerr(out[row:row + 1], want) < TOL[jnp.float32]


OPS = {
    "flash": lambda q, k, v, **o: pk.flash_attention(q, k, v, **o),
    "window": lambda q, k, v, **o: pk.flash_attention(q, k, v, causal=False, window_size=3, **o),
    "multiscale": lambda q, k, v, **o: pk.multiscale_attention(q, k, v, (3, None, 6, 1), **o),
    "sparse": lambda q, k, v, **o: pk.sparse_attention(q, k, v, block_size=4, num_random_blocks=1, **o),
}


@pytest.mark.parametrize("name", OPS)
def test_xla_gradients_match_finite_differences(rng, name):
    with x64():
        q, k, v = qkv(rng, 1, 11, 11, 4, 2, 8, jnp.float64)
        check_grads(lambda a, b, c: OPS[name](a, b, c, implementation="xla"), (q, k, v), order=1,
                    modes=["rev"])


@pytest.mark.parametrize("name", OPS)
def test_gradients_match_xla_gradients(impl, rng, name):
    q, k, v = qkv(rng, 2, 13, 13, 4, 2, 16)
    ct = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    loss = lambda **o: lambda a, b, c: jnp.sum(OPS[name](a, b, c, **o) * ct)
    got = run_or_skip(lambda: jax.grad(loss(**impl), argnums=(0, 1, 2))(q, k, v))
    want = jax.grad(loss(implementation="xla"), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        assert relerr(g, w) < 1e-4


def test_vmap_over_an_extra_axis(impl, rng):
    q, k, v = qkv(rng, 3, 9, 9, 2, 1, 16)
    batched = run_or_skip(lambda: jax.vmap(lambda a, b, c: pk.flash_attention(a[None], b[None], c[None], **impl)[0])(q, k, v))
    want = pk.flash_attention(q, k, v, implementation="xla")
    assert relerr(batched, want) < 1e-5


def test_jit(impl, rng):
    q, k, v = qkv(rng, 1, 9, 9, 2, 1, 16)
    f = jax.jit(lambda a, b, c: pk.flash_attention(a, b, c, window_size=4, **impl))
    got = run_or_skip(lambda: f(q, k, v))
    assert relerr(got, naive.softmax_attention(q, k, v, naive.window_mask(9, 9, [4, 4], True))) < 2e-5
