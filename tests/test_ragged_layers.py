"""Ragged rows (``lengths``), packed rows (``segment_ids``), soft-cap and sinks through the layers, their per-row
caches (prefill, chunked continuation, compiled decode) and ``generate``: each row equals that row run alone."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import pallas_kernels as pk
from complexity_jax import CUDA, CacheFullError, KVCache, MultiScaleAttention, SparseAttention, check_cache
from complexity_jax.generate import AttentionStack, generate
from complexity_jax.rope import apply_rope
from complexity_jax.sharding import cache_shardings, logical_specs, param_shardings
from tests.conftest import IMPLEMENTATIONS, relerr, scan_decode

HIDDEN, HEADS, KV_HEADS = 16, 4, 2
FORMS = {
    "flash": {},
    "sliding_window": {"window_size": 3},
    "sparse": {"block_size": 2, "num_global_tokens": 1, "num_local_blocks": 2, "num_random_blocks": 1},
    "multiscale": {"local_heads": 2, "window_sizes": (2, 3)},  # windows (2, 3, None, None): a ring part, a full part
    "linear": {},
}
SOFTMAX_FORMS = [f for f in FORMS if f != "linear"]
PAD = 50.0  # padding tokens hold large values, so any leak shows


def build(form, impl_name="xla", **kwargs):
    if form == "linear" and impl_name == "pallas":  # the linear kernel needs a power-of-two head_dim >= 16
        return CUDA.linear(hidden_size=HIDDEN, num_heads=1, head_dim=16, **IMPLEMENTATIONS[impl_name], **kwargs)
    return CUDA.create(form, hidden_size=HIDDEN, num_heads=HEADS, num_kv_heads=KV_HEADS,
                       **{**FORMS[form], **IMPLEMENTATIONS[impl_name], **kwargs})


def reference_of(attn):
    """The whole-sequence outputs of ``attn`` on the XLA path, compiled: ``(params, x) -> output``."""
    ref = attn.clone(implementation="xla", interpret=False)
    return jax.jit(lambda params, x: ref.apply(params, x)[0])


def pad_rows(rows, length):
    """Right-pads ``[n_r, hidden]`` rows to ``[len(rows), length, hidden]`` with ``PAD``."""
    return jnp.stack([jnp.concatenate([r, jnp.full((length - r.shape[0], HIDDEN), PAD, r.dtype)]) for r in rows])


def assert_rows(out, want_rows, counts, tol=1e-5):
    """Row ``r`` of ``out`` equals ``want_rows[r]`` on its first ``counts[r]`` positions and is zero after."""
    for r, (want, n) in enumerate(zip(want_rows, counts)):
        assert relerr(out[r, :n], want) < tol, f"row {r}"
        assert not np.any(np.asarray(out[r, n:])), f"row {r}: outputs past its length must be zeros"


# (1) Ragged rows: prefill, chunked continuation and compiled decode, each row at its own position.

PROMPTS, CHUNKS, DECODE = (5, 2, 7), (3, 1, 2), 3


@pytest.mark.parametrize("form,impl_name", [(f, "xla") for f in FORMS] + [("multiscale", "pallas"),
                                                                          ("linear", "pallas")])
def test_ragged_batch_equals_each_row_alone(rng, form, impl_name):
    attn = build(form, impl_name)
    seqs = [jnp.asarray(rng.standard_normal((p + c + DECODE, HIDDEN)), jnp.float32)
            for p, c in zip(PROMPTS, CHUNKS)]
    params = attn.init(jax.random.key(0), seqs[0][None])
    whole = reference_of(attn)
    alone = [whole(params, s[None])[0] for s in seqs]
    prompt = pad_rows([s[:p] for s, p in zip(seqs, PROMPTS)], max(PROMPTS))
    chunk = pad_rows([s[p:p + c] for s, p, c in zip(seqs, PROMPTS, CHUNKS)], max(CHUNKS) + 1)
    tokens = jnp.stack([s[p + c:] for s, p, c in zip(seqs, PROMPTS, CHUNKS)])
    prompt_lengths, chunk_lengths = jnp.array(PROMPTS), jnp.array(CHUNKS)
    want_prompt = [a[:p] for a, p in zip(alone, PROMPTS)]
    want_chunk = [a[p:p + c] for a, p, c in zip(alone, PROMPTS, CHUNKS)]

    # Eagerly: a prefill without a cache (growable), then a ragged chunk.
    out, cache = attn.apply(params, prompt, lengths=prompt_lengths)
    assert cache.length.tolist() == list(PROMPTS)
    assert_rows(out, want_prompt, PROMPTS)
    out, cache = attn.apply(params, chunk, cache=cache, lengths=chunk_lengths)
    assert cache.length.tolist() == [p + c for p, c in zip(PROMPTS, CHUNKS)]
    assert_rows(out, want_chunk, CHUNKS)

    # Compiled: the same calls into a preallocated cache, then a jitted scan decode.
    step = jax.jit(lambda c, x, n: attn.apply(params, x, cache=c, lengths=n))
    out, cache = step(attn.init_cache(3, prompt.shape[1] + chunk.shape[1] + DECODE), prompt, prompt_lengths)
    assert_rows(out, want_prompt, PROMPTS)
    out, cache = step(cache, chunk, chunk_lengths)
    assert_rows(out, want_chunk, CHUNKS)
    cache, outs = scan_decode(attn, params, cache, tokens)
    check_cache(cache)
    assert cache.length.tolist() == [p + c + DECODE for p, c in zip(PROMPTS, CHUNKS)]
    assert_rows(outs, [a[p + c:] for a, p, c in zip(alone, PROMPTS, CHUNKS)], (DECODE,) * 3)


def test_a_row_that_overflows_under_jit_keeps_its_length_and_others_go_on(rng):
    kv = jnp.asarray(rng.standard_normal((2, 5, 1, 2)), jnp.float32)
    cache = KVCache.zeros(2, 6, 1, 2, jnp.float32, growable=False).append(kv, kv, jnp.array([5, 1]))
    assert cache.length.tolist() == [5, 1]
    with pytest.raises(CacheFullError, match="row 0 of the cache holds 5 of 6 positions and cannot take 2 more"):
        cache.append(kv[:, :2], kv[:, :2])
    over = jax.jit(lambda c, t: c.append(t, t))(cache, kv[:, :2])
    assert over.length.tolist() == [5, 3] and bool(over.overflow)
    assert np.array_equal(over.keys[0], cache.keys[0]), "an overflowing row must not be overwritten"
    assert np.array_equal(over.keys[1, 1:3], kv[1, :2]), "a row with room is written at its own length"
    with pytest.raises(CacheFullError, match="overflowed"):
        check_cache(over)


# (2) Packed rows: each segment equals that segment alone (RoPE restarts), the cache continues the last segment.

SEGMENT_IDS = [[0, 0, 0, 1, 1, 1, 1, 1, 2, 2], [3, 3, 3, 3, 3, 3, 3, 9, 9, 9]]
PACKED_LENGTHS = (10, 8)  # row 1: its last segment holds one real token, then padding


def runs(ids, length):
    """``(start, stop)`` of each segment of ``ids[:length]``."""
    starts = [i for i in range(length) if i == 0 or ids[i] != ids[i - 1]]
    return list(zip(starts, starts[1:] + [length]))


@pytest.mark.parametrize("form,impl_name", [(f, "xla") for f in FORMS] + [("flash", "pallas")])
def test_packed_rows_equal_each_segment_alone_and_the_cache_continues_the_last(rng, form, impl_name):
    attn = build(form, impl_name)
    whole = reference_of(attn)
    x = jnp.asarray(rng.standard_normal((2, 10, HIDDEN)), jnp.float32)
    x = jnp.where(jnp.arange(10)[None, :, None] < jnp.array(PACKED_LENGTHS)[:, None, None], x, PAD)
    params = attn.init(jax.random.key(1), x)
    out, cache = attn.apply(params, x, segment_ids=jnp.array(SEGMENT_IDS), lengths=jnp.array(PACKED_LENGTHS))
    for r, (ids, n) in enumerate(zip(SEGMENT_IDS, PACKED_LENGTHS)):
        for a, b in runs(ids, n):
            if form == "sparse" and a > 0:
                continue  # sparse keeps the packed row's block grid: only a segment at 0 equals itself alone
            assert relerr(out[r, a:b], whole(params, x[r:r + 1, a:b])[0]) < 1e-5, f"row {r}, segment [{a}, {b})"
        assert not np.any(np.asarray(out[r, n:]))
    assert cache.length.tolist() == [2, 1]

    # The cache holds the last segment of each row as if it had been run alone: continuing it equals that segment
    # followed by the new tokens, run at once.
    nxt = jnp.asarray(rng.standard_normal((2, 2, HIDDEN)), jnp.float32)
    got, _ = attn.apply(params, nxt, cache=cache)
    for r, (ids, n) in enumerate(zip(SEGMENT_IDS, PACKED_LENGTHS)):
        a = runs(ids, n)[-1][0]
        want = whole(params, jnp.concatenate([x[r:r + 1, a:n], nxt[r:r + 1]], axis=1))
        assert relerr(got[r], want[0, -2:]) < 1e-5, f"row {r}"


# (3) Soft-cap and sinks.

def op_forward(attn, params, x, **options):
    """The layer's function spelled out with the ops (XLA path): projections, RoPE, the form's op, output."""
    p = nn.meta.unbox(params)["params"]
    b, s, _ = x.shape
    d = HIDDEN // HEADS
    q = (x @ p["q_proj"]["kernel"]).reshape(b, s, HEADS, d)
    k = (x @ p["k_proj"]["kernel"]).reshape(b, s, KV_HEADS, d)
    v = (x @ p["v_proj"]["kernel"]).reshape(b, s, KV_HEADS, d)
    positions = jnp.arange(s)
    q, k = apply_rope(q, positions, attn.rope_theta), apply_rope(k, positions, attn.rope_theta)
    options["implementation"] = "xla"
    if isinstance(attn, SparseAttention):
        o = pk.sparse_attention(q, k, v, **FORMS["sparse"], **options)
    elif isinstance(attn, MultiScaleAttention):
        o = pk.multiscale_attention(q, k, v, attn.head_windows, **options)
    else:
        o = pk.flash_attention(q, k, v, window_size=getattr(attn, "window_size", None), **options)
    return o.reshape(b, s, HEADS * d) @ p["o_proj"]["kernel"]


@pytest.mark.parametrize("form,impl_name", [(f, "xla") for f in SOFTMAX_FORMS] + [("multiscale", "pallas")])
def test_soft_cap_and_sinks_equal_the_op_and_continue(rng, form, impl_name):
    attn = build(form, impl_name, logits_soft_cap=1.5, use_sinks=True)
    x = jnp.asarray(rng.standard_normal((2, 9, HIDDEN)) * 2, jnp.float32)
    params = attn.init(jax.random.key(2), x)
    assert params["params"]["sinks"].shape == (HEADS,) and params["params"]["sinks"].dtype == jnp.float32
    assert not np.any(np.asarray(params["params"]["sinks"])), "sinks start at zero"
    sinks = jnp.asarray(rng.standard_normal(HEADS) + 1.0, jnp.float32)
    params = {"params": {**params["params"], "sinks": sinks}}
    out, _ = attn.apply(params, x)
    want = op_forward(attn, params, x, logits_soft_cap=1.5, sinks=sinks)
    assert relerr(out, want) < 1e-5
    assert relerr(op_forward(attn, params, x), want) > 1e-2, "the soft-cap and sinks must change the output"

    # Prefill into a preallocated cache, a chunk under jit and a compiled decode loop: the whole sequence's outputs.
    first, cache = attn.apply(params, x[:, :4], cache=attn.init_cache(2, 12))
    second, cache = jax.jit(lambda c, t: attn.apply(params, t, cache=c))(cache, x[:, 4:6])
    cache, rest = scan_decode(attn, params, cache, x[:, 6:])
    assert relerr(jnp.concatenate([first, second, rest], axis=1), want) < 1e-5


def test_sinks_are_a_heads_parameter_when_boxed():
    attn = build("flash", use_sinks=True, logical_partitioning=True)
    params = attn.init(jax.random.key(0), jnp.ones((1, 3, HIDDEN)))
    box = params["params"]["sinks"]
    assert isinstance(box, nn.LogicallyPartitioned) and box.names == ("heads",) and box.value.shape == (HEADS,)
    assert logical_specs(params)["params"]["sinks"] == P("heads")
    assert logical_specs(nn.meta.unbox(params))["params"]["sinks"] == P("heads")
    if jax.device_count() >= 8:  # the sinks split over "model" with the heads; per-row lengths over "data"
        mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
        assert param_shardings(params, mesh)["params"]["sinks"].spec == P("model")
        cache = attn.init_cache(4, 8)
        assert cache_shardings(cache, mesh).length.spec == P("data")
    out, _ = attn.apply(params, jnp.ones((1, 3, HIDDEN)))
    assert np.allclose(out, attn.apply(nn.meta.unbox(params), jnp.ones((1, 3, HIDDEN)))[0])


# (4) generate with ragged prompts.

def test_generate_with_prompt_lengths_equals_each_row_alone(rng):
    # A KV cache, a ring and a linear state (every form's ragged cache is tested above).
    common = dict(hidden_size=HIDDEN, num_heads=HEADS, num_kv_heads=KV_HEADS, implementation="xla")
    model = AttentionStack(tuple(CUDA.create(f, **FORMS[f], **common) for f in ("flash", "sliding_window", "linear")))
    lengths = (6, 2)
    rows = [jnp.asarray(rng.standard_normal((n, HIDDEN)) * 0.5, jnp.float32) for n in lengths]
    params = model.init(jax.random.key(3), rows[0][None])
    prefill, decoded, caches = generate(model, params, pad_rows(rows, 6), num_steps=3,
                                        prompt_lengths=jnp.array(lengths))
    assert decoded.shape == (2, 3, HIDDEN) and caches[0].length.tolist() == [9, 5]
    for r, row in enumerate(rows):
        want_prefill, want_decoded, _ = generate(model, params, row[None], num_steps=3)
        assert relerr(prefill[r, :lengths[r]], want_prefill[0]) < 1e-5
        assert not np.any(np.asarray(prefill[r, lengths[r]:]))
        assert relerr(decoded[r], want_decoded[0]) < 1e-4, f"row {r}"


# (5) Bad arguments name themselves.

def layer_and_params(form="flash"):
    attn = build(form)
    return attn, attn.init(jax.random.key(0), jnp.ones((2, 3, HIDDEN)))


@pytest.mark.parametrize("call,error,match", [
    (lambda a, p: a.apply(p, jnp.ones((2, 3, HIDDEN)), lengths=jnp.array([1, 2, 3])), ValueError, "lengths must have shape"),
    (lambda a, p: a.apply(p, jnp.ones((2, 3, HIDDEN)), lengths=jnp.array([1, 4])), ValueError, r"lengths must lie in \[0, seq_len=3\]"),
    (lambda a, p: a.apply(p, jnp.ones((2, 3, HIDDEN)), lengths=jnp.array([1.0, 2.0])), TypeError, "lengths must be an integer array"),
    (lambda a, p: a.apply(p, jnp.ones((2, 3, HIDDEN)), segment_ids=jnp.ones((2, 3))), TypeError, "segment_ids must be an integer array"),
    (lambda a, p: a.apply(p, jnp.ones((2, 3, HIDDEN)), segment_ids=jnp.ones((2, 4), jnp.int32)), ValueError, "segment_ids must have shape"),
    (lambda a, p: a.apply(p, jnp.ones((2, 3, HIDDEN)), segment_ids=-jnp.ones((2, 3), jnp.int32)), ValueError, "segment_ids must hold non-negative"),
    (lambda a, p: a.apply(p, jnp.ones((2, 1, HIDDEN)), cache=a.init_cache(2, 4), segment_ids=jnp.zeros((2, 1), jnp.int32)),
     ValueError, "segment_ids cannot be combined with a cache"),
])
def test_bad_packing_arguments_are_named(call, error, match):
    attn, params = layer_and_params()
    with pytest.raises(error, match=match):
        call(attn, params)


@pytest.mark.parametrize("form,kwargs,error,match", [
    ("flash", dict(logits_soft_cap=0.0), ValueError, "logits_soft_cap must be a finite number > 0"),
    ("sparse", dict(logits_soft_cap="2"), TypeError, "logits_soft_cap must be a real number"),
    ("multiscale", dict(use_sinks="yes"), TypeError, "use_sinks must be a bool"),
    ("linear", dict(use_sinks=True), ValueError, "use_sinks applies to the softmax forms"),
    ("linear", dict(logits_soft_cap=30.0), ValueError, "logits_soft_cap applies to the softmax forms"),
])
def test_bad_soft_cap_and_sinks_settings_are_named(form, kwargs, error, match):
    with pytest.raises(error, match=match):
        build(form, **kwargs)


def test_bad_caches_and_prompt_lengths_are_named():
    attn, params = layer_and_params()
    scalar = attn.init_cache(2, 4).replace(length=jnp.zeros((), jnp.int32))
    with pytest.raises(TypeError, match=r"cache.length must be an integer array of shape \[batch\]"):
        attn.apply(params, jnp.ones((2, 1, HIDDEN)), cache=scalar)
    model = AttentionStack((attn,))
    stack_params = model.init(jax.random.key(0), jnp.ones((2, 3, HIDDEN)))
    with pytest.raises(ValueError, match=r"prompt_lengths must lie in \[1, 3\]"):
        generate(model, stack_params, jnp.ones((2, 3, HIDDEN)), 2, prompt_lengths=jnp.array([0, 3]))
