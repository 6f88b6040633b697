"""Decode options: logit soft-cap and attention sinks in the Triton decode kernel, and block-sparse decode
(``decode_attention(..., sparse_mask=...)``), in interpret mode and on XLA against float64 references."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from complexity_jax import CUDA
from pallas_kernels._triton import decode as triton_decode
from pallas_kernels._triton.decode import DecodeConfig
from tests import naive
from tests.conftest import gpu_target, relerr, x64

SMALL = DecodeConfig(block_k=16, num_splits=3)


def inputs(seed, batch, t, capacity, heads, kv_heads, head_dim, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    make = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
    kv_shape = (batch, capacity, kv_heads, head_dim)
    return make(batch, t, heads, head_dim), make(*kv_shape), make(*kv_shape)


def sparse_cache_mask(mask: pk.SparseMask, lengths, t: int, capacity: int) -> np.ndarray:
    """bool ``[batch, heads, t, capacity]``: the rows of the prefill's ``sparse_mask(capacity)`` at the new queries'
    positions (a query at a negative position sees nothing)."""
    dense = pk.sparse_mask(capacity, mask.num_heads, mask.block_size, mask.num_global_tokens, mask.num_local_blocks,
                           mask.num_random_blocks, mask.seed)
    out = np.zeros((len(lengths), mask.num_heads, t, capacity), bool)
    for b, length in enumerate(np.asarray(lengths)):
        for r, i in enumerate(range(length - t, length)):
            if i >= 0:
                out[b, :, r] = dense[:, i]
    return out


def decode(q, k, v, lengths, impl, sinks=None, **options):
    """The public op under ``jit`` (one compilation rather than one per eager op)."""
    kernel = {"kernel_config": SMALL} if impl.get("implementation") == "pallas" else {}
    fn = lambda q, k, v, lengths, sinks: pk.decode_attention(q, k, v, lengths, sinks=sinks, **options, **kernel,
                                                             **impl)
    return jax.jit(fn)(q, k, v, jnp.asarray(lengths), sinks)


# (batch, t, capacity, heads, kv_heads, head_dim, lengths, windows, soft_cap, with_sinks)
CASES = {
    "cap_t1_gqa2": (3, 1, 70, 4, 2, 16, [1, 17, 70], None, 2.0, False),
    "sinks_t3_gqa4_per_head_windows_d24": (3, 3, 50, 4, 1, 24, [2, 20, 50], (None, 3, 17, 40), None, True),
    "both_t2_gqa2_windows_d24": (2, 2, 45, 4, 2, 24, [45, 9], (1, 16, None, 23), 1.5, True),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_soft_cap_and_sinks_match_float64(impl, case):
    batch, t, capacity, heads, kv_heads, head_dim, lengths, windows, cap, with_sinks = case
    q, k, v = inputs(0, batch, t, capacity, heads, kv_heads, head_dim)
    q = q * 3.0  # scores well past the cap
    sinks = jnp.asarray(np.random.default_rng(1).standard_normal(heads) * 2, jnp.float32) if with_sinks else None
    out = decode(q, k, v, lengths, impl, window_size=windows, softmax_scale=0.3, logits_soft_cap=cap, sinks=sinks)
    mask = naive.cache_mask(lengths, t, capacity, windows or (None,) * heads)
    want = naive.softmax_attention(q, k, v, mask, 0.3, cap, None if sinks is None else np.asarray(sinks))
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(np.asarray(out), want, rtol=2e-5, atol=2e-5)


def test_huge_logits_stay_finite_under_the_cap(impl):
    q, k, v = inputs(2, 2, 2, 40, 4, 2, 16)
    lengths, sinks = [40, 3], jnp.array([0.0, 5.0, -3.0, 30.0])
    q = q * 1e4  # scaled scores ~1e4: exp overflows without the cap
    out = decode(q, k, v, lengths, impl, softmax_scale=1.0, logits_soft_cap=30.0, sinks=sinks)
    want = naive.softmax_attention(q, k, v, naive.cache_mask(lengths, 2, 40, (None,) * 4), 1.0, 30.0, sinks)
    assert np.all(np.isfinite(np.asarray(out)))
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-4, atol=1e-4)


def test_sinks_with_no_visible_slot_give_zeros(impl):
    """A row of length 0 and queries at negative positions (t > length) output zeros, not NaN, with sinks and a cap;
    the other rows are unaffected."""
    q, k, v = inputs(3, 3, 3, 32, 4, 2, 16)
    k, v = k.at[0].set(jnp.nan), v.at[0].set(jnp.nan)  # row 0 has no filled slot: its garbage is never read
    lengths, sinks = [0, 1, 32], jnp.array([4.0, -2.0, 0.0, 50.0])
    out = np.asarray(decode(q, k, v, lengths, impl, window_size=5, logits_soft_cap=3.0, sinks=sinks))
    assert np.all(out[0] == 0) and np.all(out[1, :2] == 0)
    mask = naive.cache_mask(lengths, 3, 32, (5,) * 4)
    want = naive.softmax_attention(np.nan_to_num(q), np.nan_to_num(k), np.nan_to_num(v), mask, 0.25, 3.0, sinks)
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5)


def _kernel(q, k, v, sinks, lengths, **options):
    """The decode kernel itself with its XLA backward (what ``implementation="auto"`` runs on a GPU)."""
    return triton_decode.decode_attention(q, k, v, lengths, softmax_scale=0.3, interpret=True, config=SMALL,
                                          xla_backward=True, sinks=sinks, **options)


@pytest.mark.parametrize("sparse", [False, True], ids=["windows", "sparse"])
def test_gradients_of_the_kernel_match_xla_sinks_included(sparse):
    q, k, v = inputs(4, 2, 2, 40, 4, 2, 16)
    lengths, sinks = jnp.array([40, 1]), jnp.array([0.5, -1.0, 2.0, 0.0])
    ct = jnp.asarray(np.random.default_rng(5).standard_normal(q.shape), jnp.float32)
    if sparse:
        mask = pk.SparseMask(4, 16, 2, 1, 1, seed=3)
        options, public = {"sparse_mask": mask}, {"sparse_mask": mask}
    else:
        options, public = {"windows": (None, 7, 3, None)}, {"window_size": (None, 7, 3, None)}
    loss = lambda f: lambda *a: jnp.sum(f(*a) * ct)
    grads = lambda f: jax.jit(jax.grad(loss(f), argnums=(0, 1, 2, 3)))
    got = grads(functools.partial(_kernel, lengths=lengths, logits_soft_cap=2.5, **options))(q, k, v, sinks)
    xla = lambda q, k, v, s: pk.decode_attention(q, k, v, lengths, softmax_scale=0.3, implementation="xla",
                                                 logits_soft_cap=2.5, sinks=s, **public)
    want = grads(xla)(q, k, v, sinks)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and relerr(g, w) < 1e-5
    # No sinks: the custom_vjp takes None and returns no cotangent for it.
    got = jax.jit(jax.grad(loss(lambda q: _kernel(q, k, v, None, lengths, logits_soft_cap=2.5, **options))))(q)
    assert relerr(got, jax.jit(jax.grad(loss(lambda q: xla(q, k, v, None))))(q)) < 1e-5


def test_sinks_gradient_matches_finite_differences():
    """d/dsinks of the XLA path (what ``"auto"`` differentiates) in float64 against central differences, also for a
    row that sees nothing (its sink gradient is zero)."""
    with x64():
        q, k, v = inputs(6, 2, 2, 24, 4, 2, 8, jnp.float64)
        lengths, sinks = jnp.array([24, 1]), jnp.array([0.3, -0.7, 1.1, 0.0], jnp.float64)
        ct = jnp.asarray(np.random.default_rng(7).standard_normal(q.shape))
        loss = jax.jit(lambda s, lengths=lengths: jnp.sum(pk.decode_attention(
            q, k, v, lengths, 9, implementation="auto", logits_soft_cap=2.0, sinks=s) * ct))
        grad = np.asarray(jax.jit(jax.grad(loss))(sinks, lengths))
        eps = 1e-6
        fd = [(loss(sinks.at[h].add(eps)) - loss(sinks.at[h].add(-eps))) / (2 * eps) for h in range(4)]
        np.testing.assert_allclose(grad, np.asarray(fd), rtol=1e-6, atol=1e-9)
        empty = jax.jit(jax.grad(loss))(sinks, jnp.array([0, 0]))
        assert np.all(np.asarray(empty) == 0)


def test_grad_under_pallas_raises():
    q, k, v = inputs(8, 1, 1, 32, 2, 2, 16)
    f = lambda s: jnp.sum(pk.decode_attention(q, k, v, jnp.array([20]), sinks=s, implementation="pallas",
                                              interpret=True))
    with pytest.raises(NotImplementedError, match="no Pallas backward"):
        jax.grad(f)(jnp.zeros(2))


# Sparse decode. (batch, t, capacity, heads, kv_heads, head_dim, lengths, mask, soft_cap, sinks, config)
SPARSE = {
    # Block 16 = the kernel block; global tokens, random blocks (drawn from query block 2 on), GQA 2.
    "bs16_t1_gqa2": (5, 1, 100, 4, 2, 16, [1, 16, 17, 57, 100], pk.SparseMask(4, 16, 3, 2, 2, seed=1), None, False,
                     SMALL),
    # Three new tokens across a block boundary, GQA 4, odd head_dim, ragged capacity, soft-cap and sinks, 1 split.
    "bs16_t3_gqa4_cap_sinks_d24": (4, 3, 130, 8, 2, 24, [2, 33, 64, 130], pk.SparseMask(8, 16, 1, 3, 3, seed=2),
                                   2.0, True, DecodeConfig(block_k=16, num_splits=1)),
    # A random block spans two kernel blocks; more splits than blocks.
    "bs32_bk16_t2": (3, 2, 160, 4, 4, 16, [40, 100, 160], pk.SparseMask(4, 32, 5, 2, 2, seed=4), None, True,
                     DecodeConfig(block_k=16, num_splits=7)),
    # Block 5: kernel blocks straddle mask blocks; global tokens across a kernel block.
    "bs5_t2_gqa2_no_global": (3, 2, 90, 4, 2, 16, [3, 47, 90], pk.SparseMask(4, 5, 0, 3, 3, seed=5), 1.0, False,
                              DecodeConfig(block_k=16, num_splits=2)),
    "bs5_global_20_default_config": (2, 1, 90, 4, 2, 16, [30, 89], pk.SparseMask(4, 5, 20, 1, 2, seed=6), None,
                                     False, None),
}


@pytest.mark.parametrize("case", SPARSE.values(), ids=SPARSE.keys())
def test_sparse_decode_kernel_equals_xla_and_the_prefill_mask(case):
    batch, t, capacity, heads, kv_heads, head_dim, lengths, mask, cap, with_sinks, config = case
    q, k, v = inputs(9, batch, t, capacity, heads, kv_heads, head_dim)
    sinks = jnp.linspace(-1.0, 2.0, heads) if with_sinks else None
    options = dict(softmax_scale=0.3, logits_soft_cap=cap, sinks=sinks)
    kernel = lambda q, k, v, lengths: pk.decode_attention(
        q, k, v, lengths, sparse_mask=mask, implementation="pallas", interpret=True, kernel_config=config, **options)
    public_xla = lambda q, k, v, lengths: pk.decode_attention(q, k, v, lengths, sparse_mask=mask,
                                                              implementation="xla", **options)

    def positions(q, k, v, lengths):
        q_pos, k_pos = pk.reference.cache_positions(lengths, t, capacity)
        return pk.attention_at_positions(q, k, v, q_pos, k_pos, mask, num_blocks=-(-capacity // mask.block_size),
                                         implementation="xla", **options)

    got, xla, public = (jax.jit(f)(q, k, v, jnp.asarray(lengths)) for f in (kernel, positions, public_xla))
    np.testing.assert_allclose(np.asarray(got), np.asarray(xla), rtol=2e-5, atol=2e-5)
    want = naive.softmax_attention(q, k, v, sparse_cache_mask(mask, lengths, t, capacity), 0.3, cap,
                                   None if sinks is None else np.asarray(sinks))
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(public), np.asarray(xla), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("block_k", [16, 32])
def test_sparse_block_lists_hold_exactly_the_visible_blocks(block_k):
    """Per (row, KV head) the kernel visits the key blocks holding a slot some query of the group sees, each once:
    O(band + global + random blocks) whatever the capacity."""
    t, capacity, heads, kv_heads, mask = 2, 200, 4, 2, pk.SparseMask(4, 16, 3, 2, 2, seed=8)
    lengths = np.array([0, 1, 2, 16, 17, 33, 64, 65, 150, 200])
    group, rows = heads // kv_heads, 16
    lay = triton_decode._Layout(len(lengths), t, group, kv_heads, rows, capacity, block_k)
    sparse = triton_decode._Sparse(mask)
    offsets = jnp.asarray(triton_decode._row_offsets(t, group, rows))
    arrays = jax.jit(lambda lengths: sparse.inputs(lengths, offsets, lay)[0])(jnp.asarray(lengths))
    dense = sparse_cache_mask(mask, lengths, t, capacity).reshape(len(lengths), kv_heads, group * t, capacity)
    bound = sparse.bounds(t, group, capacity, block_k)[3]
    for b in range(len(lengths)):
        for g in range(kv_heads):
            seen = np.flatnonzero(dense[b, g].any(axis=0))
            want = sorted({int(j) // block_k for j in seen})
            count = int(arrays["counts"][b, g])
            assert list(np.asarray(arrays["blocks"][b, g, :count])) == want, (lengths[b], g)
            assert count <= bound


def test_sparse_layer_continuation_under_pallas_equals_xla(rng):
    """The layer's soft-cap and sinks reach the decode kernel too."""
    kwargs = dict(hidden_size=32, num_heads=4, num_kv_heads=2, block_size=16, num_global_tokens=2,
                  num_local_blocks=1, num_random_blocks=1, logits_soft_cap=5.0, use_sinks=True)
    xla_layer = CUDA.sparse(**kwargs, implementation="xla")
    kernel_layer = CUDA.sparse(**kwargs, implementation="pallas", interpret=True)
    x = jnp.asarray(rng.standard_normal((2, 20, 32)), jnp.float32) * 4
    params = xla_layer.init(jax.random.key(0), x[:, :1])
    params["params"]["sinks"] = jnp.array([1.0, -1.0, 0.5, 2.0])
    whole = jax.jit(lambda x: xla_layer.apply(params, x)[0])(x)
    outs = {}
    for name, layer in (("xla", xla_layer), ("pallas", kernel_layer)):
        step = jax.jit(lambda x, cache, layer=layer: layer.apply(params, x, cache=cache))
        cache, start, pieces = layer.init_cache(2, 24), 0, []
        for n in (17, 3):  # random blocks are drawn from query block 1 on
            out, cache = step(x[:, start:start + n], cache)
            pieces.append(out)
            start += n
        outs[name] = jnp.concatenate(pieces, axis=1)
    assert relerr(outs["pallas"], outs["xla"]) < 1e-5
    assert relerr(outs["xla"], whole) < 1e-5


def test_sparse_decode_partitions_over_batch_and_heads():
    """Batch- and head-sharded inputs under jit: each device runs its heads' random blocks (one static branch per head
    shard), sinks follow the heads; equal to XLA, nothing gathered."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 host devices")
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    q, k, v = inputs(10, 4, 1, 48, 8, 4, 16)
    lengths, sinks, mask = jnp.array([48, 17, 30, 2]), jnp.linspace(-1, 1, 8), pk.SparseMask(8, 16, 1, 1, 1, seed=2)
    spec = NamedSharding(mesh, P("data", None, "model"))
    fn = jax.jit(lambda q, k, v: pk.decode_attention(q, k, v, lengths, sparse_mask=mask, sinks=sinks,
                                                     implementation="pallas", interpret=True, kernel_config=SMALL))
    qs, ks, vs = (jax.device_put(x, spec) for x in (q, k, v))
    out = fn(qs, ks, vs)
    want = pk.decode_attention(q, k, v, lengths, sparse_mask=mask, sinks=sinks, implementation="xla")
    assert relerr(out, want) < 1e-5
    assert "all-gather" not in fn.lower(qs, ks, vs).compile().as_text()


def test_errors():
    q, k, v = inputs(11, 1, 1, 16, 2, 2, 16)
    lengths, mask = jnp.array([5]), pk.SparseMask(2, 16)
    with pytest.raises(ValueError, match="window_size or sparse_mask, not both"):
        pk.decode_attention(q, k, v, lengths, 4, sparse_mask=mask)
    with pytest.raises(ValueError, match="non-causal SparseMask cannot be decoded"):
        pk.decode_attention(q, k, v, lengths, sparse_mask=pk.SparseMask(2, 16, causal=False))
    with pytest.raises(ValueError, match="one head per query head"):
        pk.decode_attention(q, k, v, lengths, sparse_mask=pk.SparseMask(4, 16))
    with pytest.raises(TypeError, match="sparse_mask must be a pallas_kernels.SparseMask"):
        pk.decode_attention(q, k, v, lengths, sparse_mask="bigbird")
    with pytest.raises(ValueError, match="block_size"):
        pk.decode_attention(q, k, v, lengths, sparse_mask=pk.SparseMask(2, 0))
    with pytest.raises(ValueError, match="exactly one of windows and sparse_mask"):
        triton_decode.decode_attention(q, k, v, lengths, softmax_scale=1.0)


@pytest.mark.parametrize("variant", ["cap_sinks_windows", "sparse_t1", "sparse_t3_cap_sinks_d96_f32"])
def test_lowers_to_triton(variant):
    """The new variants cross-lower to Triton on any host (the Triton compiler itself runs in the ``gpu`` tests)."""
    t, head_dim, dtype = (3, 96, jnp.float32) if variant.endswith("f32") else (1, 128, jnp.bfloat16)
    q = jax.ShapeDtypeStruct((8, t, 32, head_dim), dtype)
    kv = jax.ShapeDtypeStruct((8, 32768, 8, head_dim), dtype)
    options = dict(softmax_scale=0.1)
    if variant == "cap_sinks_windows":
        options.update(windows=(None, 1024) * 16, logits_soft_cap=30.0)
    elif variant == "sparse_t1":
        options.update(sparse_mask=pk.SparseMask(32, 64, 1, 3, 3))
    else:
        options.update(sparse_mask=pk.SparseMask(32, 48, 2, 3, 2), logits_soft_cap=50.0)
    fn = lambda q, k, v, lengths, sinks: triton_decode.decode_attention(
        q, k, v, lengths, sinks=None if variant == "sparse_t1" else sinks, **options)
    with gpu_target():
        lowered = jax.jit(fn).trace(q, kv, kv, jax.ShapeDtypeStruct((8,), jnp.int32),
                                    jax.ShapeDtypeStruct((32,), jnp.float32)).lower(lowering_platforms=("cuda",))
    assert "__gpu$xla.gpu.triton" in lowered.as_text()


# GPU: the compiled kernels at realistic sizes against XLA in float32.

def _gpu_inputs(batch, t, capacity, heads, kv_heads, head_dim, dtype=jnp.bfloat16):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (batch, t, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, capacity, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, capacity, kv_heads, head_dim), dtype)
    return q, k, v


def _against_xla_f32(q, k, v, lengths, **options):
    out = jax.jit(lambda *a: pk.decode_attention(*a, implementation="pallas", **options))(q, k, v, lengths)
    f32 = lambda x: x.astype(jnp.float32)
    want = pk.decode_attention(f32(q), f32(k), f32(v), lengths, implementation="xla", **options)
    assert out.dtype == q.dtype
    assert relerr(out, want) < 1e-2


LENGTHS = [32768, 1, 129, 5000, 16384, 32767, 300, 20000]


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, (1000, 4096, 300, 64)])
def test_gpu_soft_cap_and_sinks(window):
    q, k, v = _gpu_inputs(8, 1, 32768, 32, 8, 128)
    sinks = jnp.linspace(-2.0, 4.0, 32)
    window = window if window is None else window * 8
    _against_xla_f32(q * 4, k, v, jnp.array(LENGTHS), window_size=window, logits_soft_cap=30.0, sinks=sinks)


@pytest.mark.gpu
@pytest.mark.parametrize("t,block_size,options", [
    (1, 64, {}),
    (4, 64, {"logits_soft_cap": 50.0, "sinks": jnp.linspace(-1.0, 1.0, 32)}),
    (1, 128, {"sinks": jnp.zeros(32)}),
])
def test_gpu_sparse_decode(t, block_size, options):
    q, k, v = _gpu_inputs(8, t, 32768, 32, 8, 128)
    mask = pk.SparseMask(32, block_size, num_global_tokens=64, num_local_blocks=3, num_random_blocks=3, seed=1)
    _against_xla_f32(q, k, v, jnp.array(LENGTHS), sparse_mask=mask, **options)
