"""The Flax layers: parameters, semantics against the ops, RoPE, and cache continuation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from complexity_jax import CUDA, CacheFullError, KVCache, LinearCache, MultiScaleCache, RingCache, check_cache
from complexity_jax.rope import apply_rope
from tests import naive
from tests.conftest import relerr, scan_decode

HIDDEN, HEADS, KV_HEADS = 32, 4, 2

FORMS = {
    "flash": {},
    "sliding_window": {"window_size": 5},
    "sparse": {"block_size": 4, "num_global_tokens": 2, "num_local_blocks": 2, "num_random_blocks": 1},
    "linear": {},
    "multiscale": {"local_heads": 3, "window_sizes": (2, 6)},
}


def build(form, **kwargs):
    return CUDA.create(form, hidden_size=HIDDEN, num_heads=HEADS, num_kv_heads=KV_HEADS,
                       **{**FORMS[form], **kwargs})


def inputs(rng, b=2, s=19, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal((b, s, HIDDEN)), dtype)


def test_parameters_follow_the_contract(rng):
    attn = CUDA.flash(hidden_size=HIDDEN, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=6)
    params = attn.init(jax.random.key(0), inputs(rng))["params"]
    shapes = {name: p["kernel"].shape for name, p in params.items()}
    assert shapes == {"q_proj": (32, 24), "k_proj": (32, 12), "v_proj": (32, 12), "o_proj": (24, 32)}
    assert all(set(p) == {"kernel"} for p in params.values())
    assert params["q_proj"]["kernel"].dtype == jnp.float32


def manual_forward(attn, params, x, mask=None, linear=False):
    """The layer's function spelled out with the float64 naive references."""
    p = {n: np.asarray(v["kernel"], np.float64) for n, v in params["params"].items()}
    b, s, _ = x.shape
    d = HIDDEN // HEADS
    x = np.asarray(x, np.float64)
    q = (x @ p["q_proj"]).reshape(b, s, HEADS, d)
    k = (x @ p["k_proj"]).reshape(b, s, KV_HEADS, d)
    v = (x @ p["v_proj"]).reshape(b, s, KV_HEADS, d)
    if attn.use_rope:
        pos = np.arange(s)
        inv = 10000.0 ** (-np.arange(d // 2) * 2 / d)
        ang = pos[:, None] * inv[None]
        cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
        rot = lambda t: np.concatenate([t[..., :d // 2] * cos - t[..., d // 2:] * sin,
                                        t[..., d // 2:] * cos + t[..., :d // 2] * sin], -1)
        q, k = rot(q), rot(k)
    out = naive.linear_attention(q, k, v, "elu", True)[0] if linear else naive.softmax_attention(q, k, v, mask)
    return out.reshape(b, s, HEADS * d) @ p["o_proj"]


@pytest.mark.parametrize("form", list(FORMS))
def test_layer_computes_its_documented_function(rng, form):
    attn = build(form)
    x = inputs(rng)
    params = attn.init(jax.random.key(1), x)
    out, _ = attn.apply(params, x)
    s = x.shape[1]
    if form == "flash":
        mask = naive.window_mask(s, s, [None] * HEADS, True)
    elif form == "sliding_window":
        mask = naive.window_mask(s, s, [5] * HEADS, True)
    elif form == "multiscale":
        mask = naive.window_mask(s, s, [2, 2, 6, None], True)  # local head h: window_sizes[h * 2 // 3]
    elif form == "sparse":
        mask = pk.sparse_mask(s, HEADS, **FORMS["sparse"])
    else:
        mask = None
    want = manual_forward(attn, params, x, mask, linear=form == "linear")
    assert out.shape == x.shape
    assert relerr(out, want) < 1e-5


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("chunks", [(19,), (1,) * 19, (7, 1, 5, 6), (3, 16)])
def test_cache_continuation_equals_the_whole_sequence(rng, form, chunks):
    attn = build(form)
    x = inputs(rng, s=sum(chunks))
    params = attn.init(jax.random.key(2), x)
    whole, _ = attn.apply(params, x)
    pieces, cache, start = [], None, 0
    for n in chunks:
        out, cache = attn.apply(params, x[:, start:start + n], cache=cache)
        pieces.append(out)
        start += n
    assert relerr(jnp.concatenate(pieces, 1), whole) < 1e-5


@pytest.mark.parametrize("form", list(FORMS))
def test_compiled_scan_decode_loop_equals_the_whole_sequence(rng, form):
    attn = build(form)
    x = inputs(rng, s=20)
    params = attn.init(jax.random.key(3), x)
    whole, _ = attn.apply(params, x)
    prefill, cache = attn.apply(params, x[:, :6], cache=attn.init_cache(2, 24, jnp.float32))
    cache, outs = scan_decode(attn, params, cache, x[:, 6:])
    check_cache(cache)
    assert relerr(jnp.concatenate([prefill, outs], 1), whole) < 1e-5


def test_cache_memory_matches_the_form(rng):
    x = inputs(rng, s=40)
    caches = {}
    for form in FORMS:
        attn = build(form)
        caches[form] = attn.apply(attn.init(jax.random.key(0), x), x)[1]
    assert isinstance(caches["flash"], KVCache) and caches["flash"].keys.shape == (2, 40, KV_HEADS, 8)
    assert isinstance(caches["sliding_window"], RingCache) and caches["sliding_window"].keys.shape == (2, 5, KV_HEADS, 8)
    assert isinstance(caches["linear"], LinearCache) and caches["linear"].state.kv.shape == (2, KV_HEADS, 8, 8)
    ring = build("sliding_window").init_cache(3, 10_000, jnp.bfloat16)
    assert ring.keys.shape == (3, 5, KV_HEADS, 8) and ring.keys.dtype == jnp.bfloat16


@pytest.mark.parametrize("form", ["flash", "multiscale"])
def test_preallocated_cache_refuses_overflow_eagerly_and_flags_it_under_jit(rng, form):
    attn = build(form)
    stored_keys = lambda c: c.full.keys if isinstance(c, MultiScaleCache) else c.keys
    x = inputs(rng, s=6)
    params = attn.init(jax.random.key(0), x)
    cache = attn.init_cache(2, 8, jnp.float32)
    _, cache = attn.apply(params, x, cache=cache)
    with pytest.raises(CacheFullError, match="cannot take 3 more"):
        attn.apply(params, x[:, :3], cache=cache)
    step = jax.jit(lambda c, t: attn.apply(params, t, cache=c))
    _, full = step(cache, x[:, :2])
    check_cache(full)
    _, over = step(full, x[:, :1])
    assert bool(over.overflow) and over.length.tolist() == [8, 8]
    assert np.array_equal(stored_keys(over), stored_keys(full)), "an overflow must not overwrite stored keys"
    with pytest.raises(CacheFullError, match="overflowed"):
        check_cache(over)


def test_growable_cache_grows_eagerly(rng):
    attn = build("flash")
    x = inputs(rng, s=12)
    params = attn.init(jax.random.key(0), x)
    _, cache = attn.apply(params, x[:, :4])
    assert cache.capacity == 4
    _, cache = attn.apply(params, x[:, 4:], cache=cache)
    assert cache.capacity >= 12 and cache.length.tolist() == [12, 12] and not bool(cache.overflow)


def test_rope_rotates_pairs_and_keeps_norms(rng):
    x = jnp.asarray(rng.standard_normal((1, 5, 2, 8)), jnp.float32)
    pos = jnp.arange(5) + 3
    y = apply_rope(x, pos, 10000.0)
    assert relerr(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1)) < 1e-6
    angle = 3 * 10000.0 ** (-2 * 1 / 8)  # pair i=1 at position 3
    want = x[0, 0, 0, 1] * np.cos(angle) - x[0, 0, 0, 5] * np.sin(angle)
    assert abs(float(y[0, 0, 0, 1]) - want) < 1e-5


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_dtype_and_param_dtype(rng, dtype):
    attn = build("flash", dtype=dtype, param_dtype=jnp.bfloat16)
    x = inputs(rng, dtype=jnp.float32)
    params = attn.init(jax.random.key(0), x)
    assert params["params"]["q_proj"]["kernel"].dtype == jnp.bfloat16
    out, _ = attn.apply(params, x)
    assert out.dtype == dtype


def test_non_causal_layers_see_the_future_and_refuse_a_cache(rng):
    attn = build("flash", causal=False)
    x = inputs(rng, s=9)
    params = attn.init(jax.random.key(0), x)
    out, cache = attn.apply(params, x)
    assert cache is None
    changed = x.at[:, -1].add(1.0)
    assert not np.allclose(attn.apply(params, changed)[0][:, 0], out[:, 0])
    with pytest.raises(ValueError, match="causal=False"):
        attn.init_cache(1, 4)


@pytest.mark.parametrize("form", list(FORMS))
def test_layers_run_the_pallas_kernels_in_interpret_mode(rng, form):
    attn = build(form, implementation="pallas", interpret=True)
    x = inputs(rng, s=13)
    try:
        params = attn.init(jax.random.key(0), x)
        out, _ = attn.apply(params, x)
    except NotImplementedError as e:
        pytest.skip(f"no Pallas kernel yet: {e}")
    ref, _ = build(form, implementation="xla").apply(params, x)
    assert relerr(out, ref) < 1e-4


def test_vmap_over_layer_apply(rng):
    attn = build("sliding_window")
    x = inputs(rng, b=1, s=7)
    params = attn.init(jax.random.key(0), x)
    xs = jnp.stack([x, x * 2])
    out = jax.vmap(lambda t: attn.apply(params, t)[0])(xs)
    assert relerr(out[1], attn.apply(params, x * 2)[0]) < 1e-6
