"""The multi-scale cache: all-local key/value heads keep a ring of their largest window, the rest every position."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from complexity_jax import CUDA, CacheFullError, KVCache, MultiScaleCache, RingCache, check_cache
from tests.conftest import IMPLEMENTATIONS, relerr, scan_decode

HIDDEN, HEAD_DIM = 32, 4


def build(num_heads=8, num_kv_heads=4, local_heads=4, window_sizes=(4, 8), **kwargs):
    return CUDA.multiscale(hidden_size=HIDDEN, num_heads=num_heads, num_kv_heads=num_kv_heads,
                           local_heads=local_heads, window_sizes=window_sizes, **kwargs)


def inputs(s, b=2, seed=0):
    return jax.random.normal(jax.random.key(seed), (b, s, HIDDEN), jnp.float32)


def run_chunks(attn, params, x, chunks, cache=None, step=None):
    step = step or (lambda c, t: attn.apply(params, t, cache=c))
    pieces, start = [], 0
    for n in chunks:
        out, cache = step(cache, x[:, start:start + n])
        pieces.append(out)
        start += n
    assert start == x.shape[1]
    return jnp.concatenate(pieces, 1), cache


# (1) The layout.

def test_layout_rings_for_all_local_kv_heads_and_full_part_for_the_global_ones():
    attn = build()  # windows (4, 4, 8, 8, None, None, None, None), group 2
    cache = attn.init_cache(2, 40, jnp.float32)
    assert isinstance(cache, MultiScaleCache)
    assert [r.keys.shape for r in cache.rings] == [(2, 4, 1, HEAD_DIM), (2, 8, 1, HEAD_DIM)]
    assert isinstance(cache.full, KVCache) and cache.full.keys.shape == (2, 40, 2, HEAD_DIM)
    assert [(p.kv_start, p.kv_stop, p.q_start, p.q_stop, p.ring) for p in cache.parts] == [
        (0, 1, 0, 2, 4), (1, 2, 2, 4, 8), (2, 4, 4, 8, None)]
    # The static layout is metadata, not traced leaves.
    leaves = jax.tree_util.tree_leaves(cache)
    assert len(leaves) == 4 + 3 * 2 and all(isinstance(leaf, jax.Array) for leaf in leaves)


def test_layout_ring_is_the_largest_window_of_its_query_heads():
    # windows (2, 2, 2, 6, 6, 6, None, None), group 2: KV head 1 serves windows 2 and 6 -> ring 6.
    attn = build(num_heads=8, num_kv_heads=4, local_heads=6, window_sizes=(2, 6))
    cache = attn.init_cache(1, 16)
    assert [(p.kv_start, p.kv_stop, p.ring, p.windows) for p in cache.parts] == [
        (0, 1, 2, (2, 2)), (1, 3, 6, (2, 6, 6, 6)), (3, 4, None, (None, None))]
    assert [r.keys.shape for r in cache.rings] == [(1, 2, 1, HEAD_DIM), (1, 6, 2, HEAD_DIM)]


def test_layout_a_gqa_group_mixing_local_and_global_heads_is_in_the_full_part():
    attn = build(num_heads=8, num_kv_heads=2, local_heads=5, window_sizes=(3,))  # group 4: heads 4..7 mix
    cache = attn.init_cache(1, 16)
    assert [(p.kv_start, p.kv_stop, p.ring, p.windows) for p in cache.parts] == [
        (0, 1, 3, (3, 3, 3, 3)), (1, 2, None, (3, None, None, None))]
    assert cache.full.keys.shape == (1, 16, 1, HEAD_DIM) and cache.rings[0].keys.shape == (1, 3, 1, HEAD_DIM)
    # One KV head serving everything: the whole cache is the full part.
    one = build(num_heads=8, num_kv_heads=1, local_heads=7, window_sizes=(3,)).init_cache(1, 16)
    assert one.rings == () and one.full.keys.shape == (1, 16, 1, HEAD_DIM)


def test_layout_all_local_has_no_full_part_and_all_global_no_ring():
    local = build(local_heads=8, window_sizes=(2, 3, 5, 7)).init_cache(2, 1000)
    assert local.full is None and local.capacity is None
    assert [r.keys.shape[1] for r in local.rings] == [2, 3, 5, 7]
    assert not bool(local.overflow)
    check_cache(local)
    glob = build(local_heads=0).init_cache(2, 10)
    assert glob.rings == () and glob.full.keys.shape == (2, 10, 4, HEAD_DIM)


# (2) Continuation equals the whole sequence.

CONFIGS = {
    "gqa1": dict(num_heads=4, num_kv_heads=4, local_heads=3, window_sizes=(2, 5)),
    "gqa2": dict(num_heads=8, num_kv_heads=4, local_heads=5, window_sizes=(4, 6)),   # KV head 2 mixes
    "gqa2_all_local": dict(num_heads=4, num_kv_heads=2, local_heads=4, window_sizes=(3, 5)),
    "unsorted_windows": dict(num_heads=4, num_kv_heads=4, local_heads=3, window_sizes=(5, 2, 5)),
}


@pytest.mark.slow
@pytest.mark.parametrize("config,chunks", [
    ("gqa1", (3, 1, 5, 5)),      # uneven chunks, past every ring
    ("gqa2", (9, 1, 1, 3)),      # a first chunk longer than the rings, then tokens
])
def test_eager_continuation_equals_the_whole_sequence(config, chunks):
    attn = build(**CONFIGS[config], implementation="xla")
    x = inputs(sum(chunks))
    params = attn.init(jax.random.key(1), x)
    whole, _ = attn.apply(params, x)
    got, cache = run_chunks(attn, params, x, chunks)  # the first call has no cache: growable
    assert relerr(got, whole) < 1e-5
    assert cache.length.tolist() == [x.shape[1]] * 2 and all(r.length.tolist() == [x.shape[1]] * 2 for r in cache.rings)
    check_cache(cache)


@pytest.mark.parametrize("config,impl_name", [("gqa1", "xla"), ("gqa2", "xla"), ("gqa2", "pallas")])
def test_jit_continuation_from_init_cache_equals_the_whole_sequence(config, impl_name):
    attn = build(**CONFIGS[config], **IMPLEMENTATIONS[impl_name])
    x = inputs(16)
    params = attn.init(jax.random.key(2), x)
    whole, _ = build(**CONFIGS[config], implementation="xla").apply(params, x)
    step = jax.jit(lambda c, t: attn.apply(params, t, cache=c))
    got, cache = run_chunks(attn, params, x, (3, 1, 7, 1, 3, 1), attn.init_cache(2, 20), step)
    check_cache(cache)
    assert relerr(got, whole) < 1e-5


@pytest.mark.parametrize("config,dtype", [
    ("gqa2", jnp.bfloat16), ("gqa2_all_local", jnp.float32), ("unsorted_windows", jnp.float32)])
def test_compiled_scan_decode_loop_equals_the_whole_sequence(config, dtype):
    attn = build(**CONFIGS[config])
    x = inputs(18)
    params = attn.init(jax.random.key(3), x)
    whole, _ = attn.apply(params, x)
    prefill, cache = attn.apply(params, x[:, :3], cache=attn.init_cache(2, 24, dtype))
    assert all(c.keys.dtype == dtype for c in cache.part_caches())
    cache, outs = scan_decode(attn, params, cache, x[:, 3:])
    check_cache(cache)
    assert cache.length.tolist() == [18, 18]
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5  # a bfloat16 cache of a float32 layer rounds k and v
    assert relerr(jnp.concatenate([prefill, outs], 1), whole) < tol


# (3) Memory and overflow.

def test_ring_parts_do_not_depend_on_max_length():
    attn = build()
    small, large = attn.init_cache(3, 16, jnp.bfloat16), attn.init_cache(3, 4096, jnp.bfloat16)
    assert [r.keys.shape for r in small.rings] == [r.keys.shape for r in large.rings] == [
        (3, 4, 1, HEAD_DIM), (3, 8, 1, HEAD_DIM)]
    assert small.full.keys.shape == (3, 16, 2, HEAD_DIM) and large.full.keys.shape == (3, 4096, 2, HEAD_DIM)
    assert all(r.keys.dtype == jnp.bfloat16 for r in large.rings)
    # A call without a cache returns the same layout, the full part sized to the sequence; continuing it grows
    # only the full part.
    x = inputs(14)
    params = attn.init(jax.random.key(0), x)
    _, cache = attn.apply(params, x[:, :4])
    assert [r.keys.shape for r in cache.rings] == [(2, 4, 1, HEAD_DIM), (2, 8, 1, HEAD_DIM)]
    assert cache.full.keys.shape == (2, 4, 2, HEAD_DIM) and cache.full.growable
    _, cache = attn.apply(params, x[:, 4:], cache=cache)
    assert [r.keys.shape[1] for r in cache.rings] == [4, 8] and cache.full.capacity >= 14
    assert cache.length.tolist() == [14, 14] and not bool(cache.overflow)


def test_all_local_cache_never_runs_out_of_room():
    attn = build(**CONFIGS["gqa2_all_local"])
    x = inputs(12)
    params = attn.init(jax.random.key(0), x)
    whole, _ = attn.apply(params, x)
    got, cache = run_chunks(attn, params, x, (4, 4, 4), attn.init_cache(2, 2))
    assert relerr(got, whole) < 1e-5 and not bool(cache.overflow)


def test_wrong_caches_are_refused():
    attn = build()
    x = inputs(3)
    params = attn.init(jax.random.key(0), x)
    kv = KVCache.zeros(2, 8, 4, HEAD_DIM, jnp.float32, growable=False)
    with pytest.raises(TypeError, match="cache"):
        attn.apply(params, x, cache=kv)
    with pytest.raises(TypeError, match="cache"):
        attn.apply(params, x, cache=RingCache.zeros(2, 8, 4, HEAD_DIM, jnp.float32))
    with pytest.raises(ValueError, match="layout"):
        attn.apply(params, x, cache=build(window_sizes=(4, 6)).init_cache(2, 8))
    with pytest.raises(ValueError, match="batch"):
        attn.apply(params, x, cache=attn.init_cache(3, 8))
