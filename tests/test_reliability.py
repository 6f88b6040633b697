"""Regression tests for the edges of issue 17: each case once computed a wrong answer or crashed.

Every op is checked against the float64 references of ``tests/naive.py`` on the XLA path and on the Pallas
kernels in interpret mode (the ``impl`` fixture).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from complexity_jax import CUDA
from tests import naive
from tests.conftest import relerr


def qkv(rng, b, sq, sk, h, kvh, d, dtype=jnp.float32, scale=1.0):
    make = lambda *shape: jnp.asarray(scale * rng.standard_normal(shape), dtype)
    return make(b, sq, h, d), make(b, sk, kvh, d), make(b, sk, kvh, d)


@pytest.mark.parametrize("softmax_scale", [-0.7, 0.0, 1e-3])
def test_any_finite_softmax_scale(impl, rng, softmax_scale):
    q, k, v = qkv(rng, 2, 11, 11, 4, 2, 16)
    windows = [None, 3, 5, None]
    got = pk.multiscale_attention(q, k, v, windows, softmax_scale=softmax_scale, **impl)
    assert relerr(got, naive.softmax_attention(q, k, v, naive.window_mask(11, 11, windows, True), softmax_scale)) < 2e-5
    got = pk.sparse_attention(q, k, v, block_size=4, num_random_blocks=1, softmax_scale=softmax_scale, **impl)
    want = naive.softmax_attention(q, k, v, pk.sparse_mask(11, 4, block_size=4, num_random_blocks=1), softmax_scale)
    assert relerr(got, want) < 2e-5
    lengths = jnp.array([5, 11])
    got = pk.decode_attention(q[:, :2], k, v, lengths, softmax_scale=softmax_scale, **impl)
    want = naive.softmax_attention(q[:, :2], k, v, naive.cache_mask(lengths, 2, 11, [None] * 4), softmax_scale)
    assert relerr(got, want) < 2e-5


@pytest.mark.parametrize("softmax_scale", [float("nan"), float("inf")])
def test_non_finite_softmax_scale_is_refused(softmax_scale):
    q = jnp.ones((1, 4, 2, 8))
    with pytest.raises(ValueError, match=r"softmax_scale must be finite, got (nan|inf)"):
        pk.flash_attention(q, q, q, softmax_scale=softmax_scale)


@pytest.mark.parametrize("feature_map", ["elu", "relu", "softmax"])
def test_linear_attention_float16_of_large_magnitude(impl, rng, feature_map):
    # phi(q).phi(k) ~ 100 * 100 * head_dim and the summed state exceed float16's 65504.
    q, k, v = qkv(rng, 1, 40, 40, 2, 2, 16, jnp.float16)
    q, k = q * 100, k * 100
    out, state = pk.linear_attention(q, k, v, feature_map, **impl)
    want, kv, k_sum = naive.linear_attention(q, k, v, feature_map, True)
    assert out.dtype == jnp.float16
    assert relerr(out, want) < 3e-3
    assert relerr(state.kv, kv) < 1e-5 and relerr(state.k_sum, k_sum) < 1e-5
    grads = jax.grad(lambda v: pk.linear_attention(q, k, v, feature_map, **impl)[0].astype(jnp.float32).sum())(v)
    assert np.all(np.isfinite(np.asarray(grads, np.float32)))


@pytest.mark.parametrize("window", [None, 2])
def test_non_causal_with_more_queries_than_keys(impl, rng, window):
    # Queries are the last positions of the keys, so the first ones sit at negative positions.
    q, k, v = qkv(rng, 2, 9, 5, 2, 1, 16)
    got = pk.flash_attention(q, k, v, causal=False, window_size=window, **impl)
    assert relerr(got, naive.softmax_attention(q, k, v, naive.window_mask(9, 5, [window] * 2, False))) < 2e-5


@pytest.mark.parametrize("window", [None, 3])
def test_decode_never_reads_unused_or_unseen_slots(impl, rng, window):
    q, k, v = qkv(rng, 3, 2, 40, 4, 2, 16)
    lengths = jnp.array([2, 17, 40])
    mask = naive.cache_mask(lengths, 2, 40, [window] * 4)
    seen = mask.any(axis=(1, 2))[:, :, None, None]  # slots some query of the row sees
    poison = lambda x: jnp.where(seen, x, jnp.nan)
    decode = lambda q, k, v: pk.decode_attention(q, k, v, lengths, window, **impl)
    got = decode(q, poison(k), poison(v))
    assert relerr(got, naive.softmax_attention(q, k, v, mask)) < 2e-5
    if impl["implementation"] == "xla":  # the kernel has no backward; the XLA gradients stay clean too
        grads = jax.grad(lambda q, k, v: decode(q, k, v).sum(), argnums=(0, 1, 2))(q, poison(k), poison(v))
        dq, dk, dv = (np.asarray(g) for g in grads)
        assert np.all(np.isfinite(dq)) and np.all(dk[~np.broadcast_to(seen, dk.shape)] == 0)
        assert np.all(np.isfinite(dk)) and np.all(np.isfinite(dv))


# The README's guarantees on non-finite inputs, per softmax form: (op, its mask [heads, q, k]) over 40 positions and
# 4 query heads on 2 KV heads. In interpret mode the default tiles hold all 40 positions, so the queries that do not
# see the poisoned position share its tile.
NON_FINITE_FORMS = {
    "causal": (lambda q, k, v, **o: pk.flash_attention(q, k, v, **o), naive.window_mask(40, 40, [None] * 4, True)),
    "window": (lambda q, k, v, **o: pk.flash_attention(q, k, v, window_size=5, **o),
               naive.window_mask(40, 40, [5] * 4, True)),
    "multiscale": (lambda q, k, v, **o: pk.multiscale_attention(q, k, v, (5, None, 9, None), **o),
                   naive.window_mask(40, 40, [5, None, 9, None], True)),
    "sparse": (lambda q, k, v, **o: pk.sparse_attention(q, k, v, block_size=8, num_random_blocks=1, **o),
               pk.sparse_mask(40, 4, block_size=8, num_random_blocks=1)),
}
POISONED = 20  # seen by some queries of every form above, not by others


@pytest.mark.parametrize("form", list(NON_FINITE_FORMS))
def test_non_finite_key_never_reaches_a_query_that_does_not_see_it(impl, rng, form):
    run, mask = NON_FINITE_FORMS[form]
    q, k, v = qkv(rng, 1, 40, 40, 4, 2, 16)
    got = np.asarray(run(q, k.at[:, POISONED].set(jnp.nan), v, **impl))[0]  # [q, h, d]
    sees = mask[:, :, POISONED].T  # [q, h]: query i of head h sees the poisoned key
    assert sees.any() and not sees.all()
    assert np.all(np.isnan(got[sees]))  # what a query sees propagates
    assert relerr(got[~sees], naive.softmax_attention(q, k, v, mask)[0][~sees]) < 2e-5


@pytest.mark.parametrize("form", list(NON_FINITE_FORMS))
def test_what_a_non_finite_value_reaches(impl, rng, form):
    """Only what is guaranteed: the queries that see a NaN value output NaN. Those that do not see it may too, on both
    paths (an unseen key's weight is 0 and 0 * NaN = NaN in P @ V): nothing is asserted of them; the README states
    it, keep values finite. A value no query of its (batch row, KV head) sees is zeroed on the XLA path."""
    run, mask = NON_FINITE_FORMS[form]
    q, k, v = qkv(rng, 1, 40, 40, 4, 2, 16)
    got = np.asarray(run(q, k, v.at[:, POISONED].set(jnp.nan), **impl))[0]
    assert np.all(np.isnan(got[mask[:, :, POISONED].T]))
    if impl["implementation"] == "xla":  # the Pallas kernels read the whole tile holding it: no such guarantee
        lengths = jnp.array([30])  # positions 30.. are padding: no query sees them
        got = run(q, k.at[:, 30:].set(jnp.nan), v.at[:, 30:].set(jnp.inf), key_value_seq_lengths=lengths, **impl)
        want = naive.softmax_attention(q, k, v, mask & (np.arange(40) < 30))
        assert relerr(got, want) < 2e-5


@pytest.mark.parametrize("op", ["flash", "linear", "decode"])
def test_float32_inputs_under_jax_enable_x64(rng, op):
    q, k, v = qkv(rng, 2, 20, 20, 4, 2, 16)
    run = {
        "flash": lambda **o: pk.flash_attention(q, k, v, window_size=7, **o),
        "linear": lambda **o: pk.linear_attention(q, k, v, **o)[0],
        "decode": lambda **o: pk.decode_attention(q[:, :1], k, v, jnp.array([9, 20]), 5, **o),
    }[op]
    want = run(implementation="xla")
    with jax.enable_x64(True):
        got = run(implementation="pallas", interpret=True)
    assert got.dtype == jnp.float32 and relerr(got, want) < 2e-5


@pytest.mark.parametrize("form", ["flash", "sparse", "multiscale"])
def test_jit_refuses_to_continue_a_growable_cache(rng, form):
    attn = CUDA.create(attn_type=form, hidden_size=32, num_heads=4, num_kv_heads=2, implementation="xla",
                       **({"window_sizes": (2,)} if form == "multiscale" else {}))
    x = jnp.asarray(rng.standard_normal((2, 6, 32)), jnp.float32)
    params = attn.init(jax.random.key(0), x)
    _, cache = jax.jit(lambda x: attn.apply(params, x))(x[:, :5])  # a prefill under jit is fine
    assert cache.length.tolist() == [5, 5]
    with pytest.raises(ValueError, match=r"grows only eagerly.*init_cache\(batch_size, max_length\)"):
        jax.jit(lambda c, t: attn.apply(params, t, cache=c))(cache, x[:, 5:])


@pytest.mark.parametrize("form", ["sliding_window", "linear"])
def test_jit_continues_caches_that_never_overflow(rng, form):
    attn = CUDA.create(attn_type=form, hidden_size=32, num_heads=4, num_kv_heads=2, implementation="xla",
                       **({"window_size": 3} if form == "sliding_window" else {}))
    x = jnp.asarray(rng.standard_normal((2, 7, 32)), jnp.float32)
    params = attn.init(jax.random.key(0), x)
    whole, _ = attn.apply(params, x)
    first, cache = attn.apply(params, x[:, :5])
    rest, _ = jax.jit(lambda c, t: attn.apply(params, t, cache=c))(cache, x[:, 5:])
    assert relerr(jnp.concatenate([first, rest], 1), whole) < 1e-5
