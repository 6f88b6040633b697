"""Linear attention Pallas kernels (interpret mode) against a float64 quadratic reference."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels._triton import linear
from pallas_kernels._triton.linear import LinearState, linear_attention

D = 16
CHUNK = 16


def _phi(x, feature_map):
    if feature_map == "elu":
        return jax.nn.elu(x) + 1.0
    if feature_map == "relu":
        return jax.nn.relu(x)
    return jax.nn.softmax(x, axis=-1)


def _reference(q, k, v, kv0, ksum0, *, feature_map, causal):
    """Quadratic masked form; call inside ``jax.enable_x64(True)`` with float64 arrays."""
    group = q.shape[2] // k.shape[2]
    a = _phi(q, feature_map)
    b = _phi(k, feature_map)
    bq = jnp.repeat(b, group, axis=2)
    vq = jnp.repeat(v, group, axis=2)
    att = jnp.einsum("bihd,bjhd->bhij", a, bq)
    if causal:
        att = jnp.where(jnp.tril(jnp.ones(att.shape[-2:], bool)), att, 0.0)
    num = jnp.einsum("bhij,bjhd->bihd", att, vq) + jnp.einsum("bihd,bhde->bihe", a, jnp.repeat(kv0, group, axis=1))
    den = jnp.einsum("bhij->bih", att) + jnp.einsum("bihd,bhd->bih", a, jnp.repeat(ksum0, group, axis=1)) + 1e-6
    kv = kv0 + jnp.einsum("bjkd,bjke->bkde", b, v)
    ksum = ksum0 + b.sum(axis=1)
    return num / den[..., None], kv, ksum


def _inputs(seed, batch, seq, heads, kv_heads, dtype=jnp.float32, d=D):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, seq, heads, d))
    k = rng.standard_normal((batch, seq, kv_heads, d))
    v = rng.standard_normal((batch, seq, kv_heads, d))
    # A plausible carried state: z0 positive so the normaliser stays away from 0.
    kv0 = rng.standard_normal((batch, kv_heads, d, d))
    ksum0 = np.abs(rng.standard_normal((batch, kv_heads, d))) + 0.5
    arrays = [jnp.asarray(x, dtype) for x in (q, k, v)] + [jnp.asarray(x, jnp.float32) for x in (kv0, ksum0)]
    return arrays, (q, k, v, kv0, ksum0)


def _assert_close(actual, expected, rtol):
    actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    expected = np.asarray(expected, np.float64)
    scale = max(np.abs(expected).max(), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def _kernel(feature_map, causal, chunk_size=CHUNK, interpret=True):
    def f(q, k, v, kv0, ksum0):
        out, state = linear_attention(
            q, k, v, feature_map=feature_map, causal=causal, initial_state=LinearState(kv0, ksum0),
            interpret=interpret, chunk_size=chunk_size,
        )
        return out, state.kv, state.k_sum

    return f


FEATURE_MAPS = ["elu", "relu", "softmax"]


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "batch,seq,heads,kv_heads", [(1, 1, 1, 1), (2, 32, 2, 1), (1, 37, 2, 2), (2, 70, 4, 2)]
)
def test_forward(feature_map, causal, batch, seq, heads, kv_heads):
    arrays, ref_inputs = _inputs(seq, batch, seq, heads, kv_heads)
    got = _kernel(feature_map, causal)(*arrays)
    with jax.enable_x64(True):
        want = _reference(*map(jnp.asarray, ref_inputs), feature_map=feature_map, causal=causal)
    for g, w in zip(got, want):
        _assert_close(g, w, 1e-4)
    assert got[0].dtype == jnp.float32 and got[1].dtype == got[2].dtype == jnp.float32


def test_no_initial_state_default_chunk():
    arrays, ref_inputs = _inputs(3, 1, 45, 2, 1)
    q, k, v = arrays[:3]
    out, state = linear_attention(q, k, v, feature_map="elu", causal=True, initial_state=None, interpret=True)
    with jax.enable_x64(True):
        zeros = (np.zeros_like(ref_inputs[3]), np.zeros_like(ref_inputs[4]))
        want = _reference(*map(jnp.asarray, ref_inputs[:3] + zeros), feature_map="elu", causal=True)
    for g, w in zip((out, state.kv, state.k_sum), want):
        _assert_close(g, w, 1e-4)


def test_default_chunk_and_bf16_gradients_at_it():
    assert linear._default_chunk(32768, 128, 2) == 128
    assert linear._default_chunk(32768, 128, 4) == 32
    assert linear._default_chunk(32768, 256, 2) == 32
    assert linear._default_chunk(40, 64, 2) == 64
    # bf16 at 150 rows: two chunks of 128, the second ragged.
    arrays, ref_inputs = _inputs(5, 1, 150, 2, 1, dtype=jnp.bfloat16)
    q, k, v, kv0, ksum0 = arrays
    ct = jnp.asarray(np.random.default_rng(0).standard_normal(q.shape), jnp.float32)

    def loss(q, k, v, kv0, ksum0):
        out, _ = linear_attention(q, k, v, feature_map="elu", causal=True, initial_state=LinearState(kv0, ksum0),
                                  interpret=True)
        return jnp.sum(out.astype(jnp.float32) * ct)

    got = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, kv0, ksum0)
    with jax.enable_x64(True):
        bf16_inputs = [np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in arrays]

        def ref_loss(*xs):
            return jnp.sum(_reference(*xs, feature_map="elu", causal=True)[0] * np.asarray(ct, np.float64))

        want = jax.grad(ref_loss, argnums=(0, 1, 2, 3, 4))(*map(jnp.asarray, bf16_inputs))
    for g, w in zip(got, want):
        _assert_close(g, w, 3e-2)


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("causal", [True, False])
def test_initial_state_carry(feature_map, causal):
    """Two calls on the halves (the second starting from the first's state) equal one call on the whole."""
    (q, k, v, _, _), _ = _inputs(7, 2, 48, 2, 1)
    f = functools.partial(linear_attention, feature_map=feature_map, causal=causal, interpret=True, chunk_size=CHUNK)
    out, state = f(q, k, v, initial_state=None)
    out1, state1 = f(q[:, :21], k[:, :21], v[:, :21], initial_state=None)
    out2, state2 = f(q[:, 21:], k[:, 21:], v[:, 21:], initial_state=state1)
    _assert_close(state2.kv, state.kv, 1e-5)
    _assert_close(state2.k_sum, state.k_sum, 1e-5)
    if causal:
        _assert_close(jnp.concatenate([out1, out2], axis=1), out, 1e-5)


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seq,heads,kv_heads,state_cotangent", [(37, 2, 1, True), (32, 2, 2, False)])
def test_gradients(feature_map, causal, seq, heads, kv_heads, state_cotangent):
    arrays, ref_inputs = _inputs(11, 2, seq, heads, kv_heads)
    rng = np.random.default_rng(12)
    cts = [rng.standard_normal(x.shape) for x in _kernel(feature_map, causal)(*arrays)]
    if not state_cotangent:
        cts[1:] = [np.zeros_like(c) for c in cts[1:]]
    _, vjp = jax.vjp(jax.jit(_kernel(feature_map, causal)), *arrays)
    got = vjp(tuple(jnp.asarray(c, jnp.float32) for c in cts))
    with jax.enable_x64(True):
        ref = functools.partial(_reference, feature_map=feature_map, causal=causal)
        _, ref_vjp = jax.vjp(ref, *map(jnp.asarray, ref_inputs))
        want = ref_vjp(tuple(map(jnp.asarray, cts)))
    for name, g, w in zip(["q", "k", "v", "kv0", "ksum0"], got, want):
        assert g.shape == w.shape, name
        _assert_close(g, w, 1e-4)


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("seq,heads,kv_heads", [(37, 4, 2), (32, 3, 1)])
def test_causal_head_dim_tiles(monkeypatch, feature_map, seq, heads, kv_heads):
    """head_dim 64 in tiles of 16 (the causal kernels' third grid axis; softmax tiles only the value axis):
    output, final state and every gradient, initial state included, against the float64 reference."""
    monkeypatch.setattr(linear, "_TILE", 16)
    arrays, ref_inputs = _inputs(17, 2, seq, heads, kv_heads, d=64)
    f = _kernel(feature_map, True)
    got, vjp = jax.vjp(jax.jit(f), *arrays)
    rng = np.random.default_rng(18)
    cts = [rng.standard_normal(x.shape) for x in got]
    got_grads = vjp(tuple(jnp.asarray(c, jnp.float32) for c in cts))
    with jax.enable_x64(True):
        ref = functools.partial(_reference, feature_map=feature_map, causal=True)
        want, ref_vjp = jax.vjp(ref, *map(jnp.asarray, ref_inputs))
        want_grads = ref_vjp(tuple(map(jnp.asarray, cts)))
    names = ["out", "kv", "k_sum", "dq", "dk", "dv", "dkv0", "dksum0"]
    for name, g, w in zip(names, got + got_grads, want + want_grads):
        assert g.shape == w.shape, name
        _assert_close(g, w, 1e-4)


@pytest.mark.parametrize("causal", [True, False])
def test_bfloat16(causal):
    arrays, _ = _inputs(5, 1, 40, 2, 1, dtype=jnp.bfloat16)
    ref_inputs = [np.asarray(x.astype(jnp.float32), np.float64) for x in arrays]
    f = _kernel("elu", causal)
    got, vjp = jax.vjp(f, *arrays)
    cts = tuple(jnp.ones_like(x) for x in got)
    got_grads = vjp(cts)
    with jax.enable_x64(True):
        ref = functools.partial(_reference, feature_map="elu", causal=causal)
        want, ref_vjp = jax.vjp(ref, *map(jnp.asarray, ref_inputs))
        want_grads = ref_vjp(tuple(jnp.ones_like(x) for x in want))
    assert got[0].dtype == jnp.bfloat16 and got_grads[0].dtype == jnp.bfloat16
    for g, w in zip(got + got_grads, want + want_grads):
        _assert_close(g, w, 2e-2)


def test_vmap():
    arrays, _ = _inputs(9, 1, 25, 2, 1)
    stacked = [jnp.stack([x, 0.5 * x + 0.25]) for x in arrays]
    f = _kernel("softmax", causal=True)
    got = jax.vmap(f)(*stacked)
    for i in range(2):
        want = f(*(x[i] for x in stacked))
        for g, w in zip(got, want):
            _assert_close(g[i], w, 1e-6)


def test_rejects_unsupported_shapes():
    x = jnp.zeros((1, 8, 1, 24))
    with pytest.raises(NotImplementedError, match="head_dim"):
        linear_attention(x, x, x, feature_map="elu", causal=True, initial_state=None, interpret=True)
    x = jnp.zeros((1, 8, 1, 16))
    with pytest.raises(ValueError, match="chunk_size"):
        linear_attention(x, x, x, feature_map="elu", causal=True, initial_state=None, interpret=True, chunk_size=24)


# ----------------------------------------------------------------------------------------------------------------
# The Triton lowering itself; these run only where JAX sees a GPU (interpret mode does not check its rules).

gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "dtype,d,rtol",
    [(jnp.bfloat16, 64, 2e-2), (jnp.float16, 128, 2e-2), (jnp.float32, 64, 1e-4), (jnp.float32, 128, 1e-4)],
)
def test_gpu_matches_reference(feature_map, causal, dtype, d, rtol):
    """Odd length, a group of 3 and chunk_size=None, compiled for the GPU: outputs, state and all gradients."""
    arrays, _ = _inputs(13, 2, 1000, 6, 2, dtype=dtype, d=d)
    ref_inputs = [np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in arrays]
    f = jax.jit(_kernel(feature_map, causal, chunk_size=None, interpret=False))
    got, vjp = jax.vjp(f, *arrays)
    rng = np.random.default_rng(14)
    cts = [rng.standard_normal(x.shape) for x in got]
    got_grads = vjp(tuple(jnp.asarray(c, x.dtype) for c, x in zip(cts, got)))
    with jax.enable_x64(True):
        ref = functools.partial(_reference, feature_map=feature_map, causal=causal)
        want, ref_vjp = jax.vjp(ref, *map(jnp.asarray, ref_inputs))
        want_grads = ref_vjp(tuple(map(jnp.asarray, cts)))
        for g, w in zip(got + got_grads, want + want_grads):
            _assert_close(g, w, rtol)


@gpu
def test_gpu_long_sequence():
    """131072 bf16 tokens: finite, final state equal to a float64 sum, last causal row equal to non-causal."""
    arrays, _ = _inputs(15, 1, 131072, 2, 1, dtype=jnp.bfloat16, d=64)
    q, k, v = arrays[:3]

    def run(q, k, v, causal):
        return linear_attention(q, k, v, feature_map="elu", causal=causal, initial_state=None)

    out, state = jax.jit(functools.partial(run, causal=True))(q, k, v)
    out_nc, state_nc = jax.jit(functools.partial(run, causal=False))(q, k, v)
    assert bool(jnp.isfinite(out.astype(jnp.float32)).all())
    kf = np.asarray(k.astype(jnp.float32), np.float64)[0, :, 0]
    b = np.where(kf > 0, kf + 1, np.exp(np.minimum(kf, 0)))
    vf = np.asarray(v.astype(jnp.float32), np.float64)[0, :, 0]
    # Half-precision inputs multiply as bf16 (8-bit mantissa) with fp32 sums; the rounding errors average out.
    _assert_close(state.kv[0, 0], b.T @ vf, 2e-3)
    _assert_close(state.k_sum[0, 0], b.sum(0), 1e-4)
    _assert_close(state_nc.kv, state.kv, 2e-3)
    _assert_close(out[:, -1], out_nc[:, -1], 2e-2)

    def loss(q, k, v):
        return run(q, k, v, causal=True)[0].astype(jnp.float32).sum()

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    assert all(bool(jnp.isfinite(g.astype(jnp.float32)).all()) for g in grads)


@gpu
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_vmap(causal):
    """vmap adds a grid axis (4 in all for the non-causal kernels), which the lowering folds into 3."""
    arrays, _ = _inputs(16, 2, 100, 2, 1, d=64)
    stacked = [jnp.stack([x, 0.5 * x + 0.25]) for x in arrays]
    f = _kernel("relu", causal, chunk_size=None, interpret=False)
    got = jax.jit(jax.vmap(f))(*stacked)
    for i in range(2):
        want = f(*(x[i] for x in stacked))
        for g, w in zip(got, want):
            _assert_close(g[i], w, 1e-5)
