"""Packed sequences, padding, logit soft-cap and sinks in the softmax ops (flash, window, multi-scale, sparse), on the
XLA path and the Pallas kernels in interpret mode: a packed row equals each segment run alone, padding gives zeros
and zero gradients, the kernels skip the tiles of other segments, and soft-cap/sinks match a float64 reference
(gradients of the sinks included)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import pallas_kernels as pk
from tests import naive
from tests.conftest import IMPLEMENTATIONS, relerr, x64

FORMS = {
    "flash": lambda q, k, v, **o: pk.flash_attention(q, k, v, **o),
    "full": lambda q, k, v, **o: pk.flash_attention(q, k, v, causal=False, **o),
    "window": lambda q, k, v, **o: pk.flash_attention(q, k, v, window_size=5, **o),
    "multiscale": lambda q, k, v, **o: pk.multiscale_attention(q, k, v, (3, None, 7, None), **o),
}
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 24
# Segment lengths of each batch row (37 positions): several documents, then one.
PACKING = ((9, 1, 20, 7), (37,))


def _segment_ids(packing) -> np.ndarray:
    return np.stack([np.repeat(np.arange(len(row)), row) for row in packing]).astype(np.int32)


def _arrays(batch, seq, dtype, seed=0, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM):
    rng = np.random.default_rng(seed)
    make = lambda h: jnp.asarray(rng.standard_normal((batch, seq, h, head_dim)), dtype)
    return make(heads), make(kv_heads), make(kv_heads), make(heads)  # q, k, v and an output cotangent


def _value_and_grads(fn, q, k, v, ct):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(ct))


@pytest.mark.parametrize("form", list(FORMS))
def test_packed_row_equals_each_segment_alone(form, impl):
    """Forward and gradients of a packed row, segment by segment, equal the segment run on its own."""
    dtype = jnp.float32 if impl["implementation"] == "pallas" else jnp.float64
    with x64():
        q, k, v, ct = _arrays(2, 37, dtype)
        ids = jnp.asarray(_segment_ids(PACKING))
        packed = _value_and_grads(functools.partial(FORMS[form], q_segment_ids=ids, **impl), q, k, v, ct)
        for b, row in enumerate(PACKING):
            for start, n in zip(np.cumsum((0,) + row[:-1]), row):
                part = lambda x: x[b:b + 1, start:start + n]
                alone = _value_and_grads(functools.partial(FORMS[form], implementation="xla"),
                                         *(part(x).astype(jnp.float64) for x in (q, k, v, ct)))
                for name, got, want in zip(("out", "dq", "dk", "dv"), packed, alone):
                    assert relerr(part(got), want) < 1e-5, (form, b, start, name)


@pytest.mark.parametrize("form", ["flash", "full", "multiscale"])
def test_padding_gives_zeros_and_equals_the_unpadded_rows(form, impl):
    """Rows past ``query_seq_lengths`` output zeros and take zero gradient; keys past ``key_value_seq_lengths`` are
    invisible: each row equals its unpadded prefix run alone."""
    dtype = jnp.float32 if impl["implementation"] == "pallas" else jnp.float64
    lengths = (21, 33)
    with x64():
        q, k, v, ct = _arrays(2, 33, dtype, seed=1)
        # Padding holds garbage that must not matter (finite: a padded key's value is still multiplied by 0).
        options = dict(query_seq_lengths=jnp.asarray(lengths), key_value_seq_lengths=jnp.asarray(lengths), **impl)
        out, dq, dk, dv = _value_and_grads(functools.partial(FORMS[form], **options), q, k, v, ct)
        for b, n in enumerate(lengths):
            part = lambda x: x[b:b + 1, :n]
            want = _value_and_grads(functools.partial(FORMS[form], implementation="xla"),
                                    *(part(x).astype(jnp.float64) for x in (q, k, v, ct)))
            for name, got, ref in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), want):
                assert relerr(part(got), ref) < 1e-5, (form, b, name)
            for name, got in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
                assert np.all(np.asarray(got[b, n:]) == 0), (form, b, name)


def test_kernels_skip_the_tiles_of_other_segments():
    """NaN in every input of the first document (tile-aligned) reaches no other document in the forward or either
    backward kernel: their tiles are never visited (a visited tile would give 0 * NaN)."""
    config = pk.KernelConfig(16, 16, 16, 16, num_warps=4, num_stages=2, num_warps_bwd=4, num_stages_bwd=2)
    q, k, v, ct = _arrays(1, 96, jnp.float32, seed=2)
    ids = jnp.asarray(_segment_ids(((32, 16, 48),)))
    poison = lambda x: x.at[:, :32].set(jnp.nan)
    for form in ("flash", "full"):
        fn = functools.partial(FORMS[form], q_segment_ids=ids, implementation="pallas", interpret=True,
                               kernel_config=config)
        results = _value_and_grads(fn, poison(q), poison(k), poison(v), poison(ct))
        for name, x in zip(("out", "dq", "dk", "dv"), results):
            assert np.all(np.isfinite(np.asarray(x[:, 32:]))), (form, name)
        clean = _value_and_grads(fn, q, k, v, ct)
        for name, x, want in zip(("out", "dq", "dk", "dv"), results, clean):
            assert relerr(x[:, 32:], want[:, 32:]) < 1e-6, (form, name)


def test_segment_block_ranges_cover_exactly_the_visible_tiles():
    """For contiguous runs the block ranges hold every tile pair with a shared id and mark exactly the pairs of one
    shared id as entirely visible (the kernels' two phases)."""
    from pallas_kernels.block_ranges import segment_block_ranges

    ids = jnp.asarray(_segment_ids(((5, 11, 16, 3, 29),)))  # 64 positions, tiles of 8
    for by_key in (False, True):
        ranges = np.asarray(segment_block_ranges(ids, ids, 8, 8, by_key=by_key))[0]
        tiles = np.asarray(ids[0]).reshape(8, 8)
        for t, (lo, full_lo, full_hi, hi) in enumerate(ranges):
            shared = [len(set(tiles[t]) & set(tiles[u])) > 0 for u in range(8)]
            whole = [len(set(tiles[t])) == 1 and set(tiles[t]) == set(tiles[u]) for u in range(8)]
            assert [lo <= u < hi for u in range(8)] == shared, (by_key, t)
            assert all(whole[u] for u in range(full_lo, full_hi)), (by_key, t)
            assert sum(whole) == full_hi - full_lo, (by_key, t)  # one contiguous run here


def test_sparse_segments_intersect_the_bigbird_mask(impl):
    """Sparse attention keeps its block rules on absolute positions of the packed row, intersected with the
    segments (and lengths)."""
    q, k, v, ct = _arrays(2, 40, jnp.float32, seed=3)
    ids = _segment_ids(((13, 27), (40,)))
    lengths = np.array([40, 29])
    options = dict(block_size=8, num_global_tokens=2, num_local_blocks=2, num_random_blocks=1, seed=5)
    got = pk.sparse_attention(q, k, v, **options, q_segment_ids=jnp.asarray(ids),
                              query_seq_lengths=jnp.asarray(lengths), key_value_seq_lengths=jnp.asarray(lengths),
                              **impl)
    pos = np.arange(40)
    valid = pos[None, :] < lengths[:, None]
    mask = (pk.sparse_mask(40, HEADS, **options)[None] & naive.segment_mask(ids, ids)
            & valid[:, None, :, None] & valid[:, None, None, :])
    assert relerr(got, naive.softmax_attention(q, k, v, mask)) < 1e-5


SOFTMAX_FORMS = {
    **FORMS,
    "sparse": lambda q, k, v, **o: pk.sparse_attention(q, k, v, block_size=8, num_local_blocks=2,
                                                       num_random_blocks=1, **o),
}


def _naive_mask(form, seq):
    if form == "sparse":
        return pk.sparse_mask(seq, HEADS, block_size=8, num_local_blocks=2, num_random_blocks=1)
    windows = {"flash": (None,) * HEADS, "full": (None,) * HEADS, "window": (5,) * HEADS,
               "multiscale": (3, None, 7, None)}[form]
    return naive.window_mask(seq, seq, windows, causal=form != "full")


@pytest.mark.parametrize("form", list(SOFTMAX_FORMS))
def test_soft_cap_and_sinks_against_float64(form, impl):
    """Forward against the float64 reference; gradients (sinks included) against float64 autodiff of the XLA path."""
    q, k, v, ct = _arrays(2, 29, jnp.float32, seed=4)
    q = q * 3.0  # large scores: the cap matters
    sinks = jnp.asarray([0.7, -1.5, 2.0, 0.0], jnp.float32)
    fn = lambda impl_: lambda q, k, v, s: SOFTMAX_FORMS[form](q, k, v, logits_soft_cap=4.0, sinks=s, **impl_)
    out, vjp = jax.vjp(fn(impl), q, k, v, sinks)
    want = naive.softmax_attention(q, k, v, _naive_mask(form, 29), soft_cap=4.0, sinks=sinks)
    assert relerr(out, want) < 1e-5
    with x64():
        as64 = lambda x: jnp.asarray(x, jnp.float64)
        _, vjp64 = jax.vjp(fn({"implementation": "xla"}), *map(as64, (q, k, v, sinks)))
        for name, got, ref in zip(("dq", "dk", "dv", "dsinks"), vjp(ct), vjp64(as64(ct))):
            assert relerr(got, ref) < 1e-5, (form, name)


def test_sinks_gradient_matches_finite_differences():
    """d/d sinks of the float64 XLA path against central differences of the independent numpy reference."""
    sinks = np.array([0.3, -0.2, 1.1, -2.0])
    mask = naive.window_mask(11, 11, (None,) * HEADS, causal=True)
    with x64():
        q, k, v, ct = _arrays(1, 11, jnp.float64, seed=5)
        loss = lambda s: float(np.sum(naive.softmax_attention(q, k, v, mask, sinks=s) * np.asarray(ct)))
        eps = 1e-6
        numeric = [(loss(sinks + eps * e) - loss(sinks - eps * e)) / (2 * eps) for e in np.eye(4)]
        _, vjp = jax.vjp(lambda s: pk.flash_attention(q, k, v, sinks=s, implementation="xla"), jnp.asarray(sinks))
        assert relerr(vjp(ct)[0], np.array(numeric)) < 1e-6


def test_soft_cap_keeps_huge_logits_finite(impl):
    q, k, v, ct = _arrays(1, 19, jnp.float32, seed=6)
    q, k = q * 1e3, k * 1e3  # scores ~1e6: exp would overflow without the max subtraction, tanh saturates
    got = pk.flash_attention(q, k, v, logits_soft_cap=30.0, **impl)
    want = naive.softmax_attention(q, k, v, _naive_mask("flash", 19), soft_cap=30.0)
    assert relerr(got, want) < 1e-4
    grads = jax.grad(lambda q, k: jnp.sum(pk.flash_attention(q, k, v, logits_soft_cap=30.0, **impl) * ct),
                     argnums=(0, 1))(q, k)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def test_sinks_with_every_key_masked_give_zeros(impl):
    """A row that sees no key (length 0) attends only to its sink, whose value is zero: zeros, not NaN; the sinks
    still get the gradient of the rows that see keys."""
    q, k, v, ct = _arrays(2, 13, jnp.float32, seed=7)
    sinks = jnp.asarray([1.0, -1.0, 0.5, 3.0], jnp.float32)
    lengths = jnp.asarray([0, 13])
    fn = lambda q, s: pk.flash_attention(q, k, v, sinks=s, key_value_seq_lengths=lengths, **impl)
    out, vjp = jax.vjp(fn, q, sinks)
    assert np.all(np.asarray(out[0]) == 0)
    dq, dsinks = vjp(ct)
    assert np.all(np.asarray(dq[0]) == 0) and np.all(np.isfinite(np.asarray(dsinks)))
    with x64():
        _, vjp64 = jax.vjp(lambda s: pk.flash_attention(q[1:].astype(jnp.float64), k[1:].astype(jnp.float64),
                                                        v[1:].astype(jnp.float64), sinks=s, implementation="xla"),
                           sinks.astype(jnp.float64))
        assert relerr(dsinks, vjp64(ct[1:].astype(jnp.float64))[0]) < 1e-5


def test_options_partition_over_batch_and_heads():
    """Under jit with inputs sharded over batch and heads (8 host devices), segments, lengths, soft-cap and sinks
    give the unsharded result and gradients."""
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    q, k, v, ct = _arrays(4, 24, jnp.float32, seed=8, heads=8, kv_heads=4, head_dim=16)
    ids = jnp.asarray(_segment_ids(((10, 14), (24,), (3, 21), (24,))))
    lengths = jnp.asarray([24, 20, 24, 17])
    sinks = jnp.linspace(-1.0, 1.0, 8, dtype=jnp.float32)

    def loss(q, k, v, sinks, ids, lengths):
        out = pk.flash_attention(q, k, v, q_segment_ids=ids, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                 logits_soft_cap=5.0, sinks=sinks, implementation="pallas", interpret=True)
        return jnp.sum(out * ct), out

    run = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
    (_, want), want_grads = run(q, k, v, sinks, ids, lengths)
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
    heads = P("data", None, "model")
    (_, got), got_grads = run(put(q, heads), put(k, heads), put(v, heads), put(sinks, P("model")),
                              put(ids, P("data")), put(lengths, P("data")))
    assert relerr(got, want) < 1e-6
    for g, w in zip(got_grads, want_grads):
        assert relerr(g, w) < 1e-6


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"q_segment_ids": np.zeros((2, 9), np.float32)}, TypeError, "q_segment_ids must be an integer array"),
        ({"q_segment_ids": np.zeros((2, 8), np.int32)}, ValueError, r"q_segment_ids must have shape.*\(2, 9\)"),
        ({"q_segment_ids": -np.ones((2, 9), np.int32)}, ValueError, "q_segment_ids must hold non-negative ids"),
        ({"query_seq_lengths": np.array([3, 10])}, ValueError, r"query_seq_lengths must lie in \[0, seq_len=9\]"),
        ({"key_value_seq_lengths": np.array([3.0, 1.0])}, TypeError, "key_value_seq_lengths must be an integer"),
        ({"logits_soft_cap": 0.0}, ValueError, "logits_soft_cap must be a finite number > 0"),
        ({"sinks": np.zeros(3, np.float32)}, ValueError, r"sinks must have shape \[num_heads\] = \(4,\)"),
        ({"sinks": np.zeros(4, np.int32)}, TypeError, "sinks must be a floating-point array"),
        ({"sinks": np.zeros(4, np.float32), "implementation": "pallas_mosaic"}, NotImplementedError,
         "Mosaic GPU kernels do not take sinks"),
    ],
)
def test_bad_options_raise_naming_the_argument(kwargs, error, match):
    q, k, v, _ = _arrays(2, 9, jnp.bfloat16)
    with pytest.raises(error, match=match):
        pk.flash_attention(q, k, v, **{"implementation": "xla", **kwargs})


def test_kv_segment_ids_alone_need_equal_lengths():
    q, k, v, _ = _arrays(2, 9, jnp.float32)
    with pytest.raises(ValueError, match="q_segment_ids and kv_segment_ids must be given together"):
        pk.flash_attention(q[:, :4], k, v, q_segment_ids=np.zeros((2, 4), np.int32), implementation="xla")


@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_queries_shorter_than_keys_with_both_segment_ids(name):
    """Chunked prefill: the queries are the last positions of the keys, each side with its own ids."""
    impl = IMPLEMENTATIONS[name]
    q, k, v, _ = _arrays(1, 30, jnp.float32, seed=9)
    ids = _segment_ids(((12, 18),))
    got = pk.flash_attention(q[:, 20:], k, v, q_segment_ids=jnp.asarray(ids[:, 20:]),
                             kv_segment_ids=jnp.asarray(ids), **impl)
    mask = naive.window_mask(10, 30, (None,) * HEADS, causal=True)[None] & naive.segment_mask(ids[:, 20:], ids)
    assert relerr(got, naive.softmax_attention(q[:, 20:], k, v, mask)) < 1e-5


@pytest.mark.parametrize("form", ["flash", "window", "sparse"])
def test_kernels_with_options_lower_to_triton(form):
    """Forward and both backward kernels with segments, lengths, soft-cap and sinks go through the Pallas -> Triton
    lowering (what interpret mode cannot show); the Triton compiler itself runs in the ``gpu`` test."""
    from tests.conftest import gpu_target

    shape = lambda s, h: jax.ShapeDtypeStruct((2, s, h, 128), jnp.bfloat16)
    ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    fn = {"flash": FORMS["flash"], "window": FORMS["window"], "sparse": SOFTMAX_FORMS["sparse"]}[form]

    def loss(q, k, v, sinks, ids, lengths):
        out = fn(q, k, v, q_segment_ids=ids, key_value_seq_lengths=lengths, logits_soft_cap=30.0, sinks=sinks,
                 implementation="pallas_triton")
        return jnp.sum(out.astype(jnp.float32))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    with gpu_target():
        lowered = grads.trace(shape(1000, 4), shape(1000, 2), shape(1000, 2), jax.ShapeDtypeStruct((4,), jnp.float32),
                              ints(2, 1000), ints(2)).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("__gpu$xla.gpu.triton") >= 4  # forward, delta, dQ, dK/dV


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["flash", "window", "multiscale", "sparse"])
def test_real_size_options_bfloat16_against_xla_float32(form):
    """At S=4096 (bf16, GQA 16/4, d128), packed documents with padding, a soft-cap and sinks: the Triton kernels'
    output and gradients against the float32 XLA path."""
    rng = np.random.default_rng(0)
    batch, seq, heads, kv_heads, head_dim = 2, 4096, 16, 4, 128
    make = lambda h, dtype: jnp.asarray(rng.standard_normal((batch, seq, h, head_dim)), dtype)
    q, k, v, ct = make(heads, jnp.bfloat16), make(kv_heads, jnp.bfloat16), make(kv_heads, jnp.bfloat16), \
        make(heads, jnp.float32)
    ids = jnp.asarray(_segment_ids(((512, 1024, 2048, 512), (4096,))))
    lengths = jnp.asarray([4096, 3000])
    sinks = jnp.asarray(rng.standard_normal(heads), jnp.float32)
    fns = {
        "flash": lambda *a, **o: pk.flash_attention(*a, **o),
        "window": lambda *a, **o: pk.flash_attention(*a, window_size=1024, **o),
        "multiscale": lambda *a, **o: pk.multiscale_attention(*a, (256, 1024, None, None) * 4, **o),
        "sparse": lambda *a, **o: pk.sparse_attention(*a, block_size=64, **o),
    }

    def run(implementation, dtype):
        def loss(q, k, v, sinks):
            out = fns[form](q, k, v, q_segment_ids=ids, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                            logits_soft_cap=20.0, sinks=sinks, implementation=implementation)
            return jnp.sum(out.astype(jnp.float32) * ct), out
        cast = lambda x: x.astype(dtype)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(cast(q), cast(k), cast(v), sinks)

    (_, out), grads = run("pallas_triton", jnp.bfloat16)
    (_, want), want_grads = run("xla", jnp.float32)
    assert relerr(out, want) < 1e-2
    for name, g, w in zip(("dq", "dk", "dv", "dsinks"), grads, want_grads):
        assert relerr(g, w) < 2e-2, name


def test_options_lower_inside_shard_map():
    """Inside ``shard_map(check_vma=True)`` with segment ids sharded over batch only and sinks over heads only, the
    Triton kernels and their gradients (sinks included) lower for a GPU: every kernel input varies like q."""
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    if tuple(int(x) for x in jax.__version__.split(".")[:2]) >= (0, 12):
        pytest.skip("JAX 0.12 cross-lowers Triton kernels only under an abstract GPU mesh, not this 8-device CPU mesh")
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    heads = P("data", None, "model")
    q = jax.ShapeDtypeStruct((4, 64, 8, 16), jnp.float32, sharding=NamedSharding(mesh, heads))
    ids = jax.ShapeDtypeStruct((4, 64), jnp.int32, sharding=NamedSharding(mesh, P("data")))
    sinks = jax.ShapeDtypeStruct((8,), jnp.float32, sharding=NamedSharding(mesh, P("model")))

    def loss(q, ids, sinks):
        out = pk.flash_attention(q, q, q, q_segment_ids=ids, logits_soft_cap=5.0, sinks=sinks,
                                 implementation="pallas")
        return jax.lax.psum(jnp.sum(out), ("data", "model"))

    local = jax.shard_map(jax.grad(loss, argnums=(0, 2)), mesh=mesh, in_specs=(heads, P("data"), P("model")),
                          out_specs=(heads, P("model")))
    assert "triton" in jax.jit(local).trace(q, ids, sinks).lower(lowering_platforms=("cuda",)).as_text().lower()
