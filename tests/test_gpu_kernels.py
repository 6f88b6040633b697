"""The Pallas kernels compiled for the GPU (Triton lowering) at real sizes, in bf16, against the XLA path.

Marked ``gpu``: skipped where JAX has no CUDA device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels as pk
from tests.conftest import relerr

pytestmark = pytest.mark.gpu


def qkv(b, s, h, kvh, d, dtype=jnp.bfloat16, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (b, s, h, d), dtype),
            jax.random.normal(keys[1], (b, s, kvh, d), dtype),
            jax.random.normal(keys[2], (b, s, kvh, d), dtype))


def f32(*xs):
    return tuple(x.astype(jnp.float32) for x in xs)


SOFTMAX_CASES = {
    "causal": lambda q, k, v, **o: pk.flash_attention(q, k, v, **o),
    "full": lambda q, k, v, **o: pk.flash_attention(q, k, v, causal=False, **o),
    "window1024": lambda q, k, v, **o: pk.flash_attention(q, k, v, window_size=1024, **o),
    "window100": lambda q, k, v, **o: pk.flash_attention(q, k, v, window_size=100, **o),
    "multiscale": lambda q, k, v, **o: pk.multiscale_attention(
        q, k, v, (256,) * 3 + (512,) * 3 + (1024,) * 2 + (None,) * 8, **o),
}


@pytest.mark.parametrize("case", list(SOFTMAX_CASES))
@pytest.mark.parametrize("seq_len,head_dim", [(4096, 128), (1999, 64), (1024, 256)])
def test_softmax_forward_and_gradients(case, seq_len, head_dim):
    fn = SOFTMAX_CASES[case]
    q, k, v = qkv(1, seq_len, 16, 4, head_dim)
    ct = jax.random.normal(jax.random.key(5), q.shape, jnp.float32)
    loss = lambda *a, **o: jnp.sum(fn(*a, **o).astype(jnp.float32) * ct)
    out = jax.jit(lambda *a: fn(*a, implementation="pallas"))(q, k, v)
    want = fn(*f32(q, k, v), implementation="xla")
    assert out.dtype == jnp.bfloat16
    assert relerr(out, want) < 1e-2
    got = jax.jit(jax.grad(lambda *a: loss(*a, implementation="pallas"), argnums=(0, 1, 2)))(q, k, v)
    ref = jax.grad(lambda *a: loss(*a, implementation="xla"), argnums=(0, 1, 2))(*f32(q, k, v))
    for g, r in zip(got, ref):
        assert relerr(g, r) < 2e-2


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.float32])
def test_softmax_other_dtypes_and_short_queries(dtype):
    q, k, v = qkv(2, 777, 8, 8, 128, dtype)
    q = q[:, -100:]
    out = pk.flash_attention(q, k, v, window_size=300, implementation="pallas")
    want = pk.flash_attention(*f32(q, k, v), window_size=300, implementation="xla")
    assert relerr(out, want) < 1e-2


@pytest.mark.parametrize("feature_map", ["elu", "relu", "softmax"])
@pytest.mark.parametrize("causal", [True, False])
def test_linear_forward_and_gradients(feature_map, causal):
    q, k, v = qkv(1, 3000, 8, 4, 128)
    fn = lambda *a, **o: pk.linear_attention(*a, feature_map, causal, **o)[0]
    out = jax.jit(lambda *a: fn(*a, implementation="pallas"))(q, k, v)
    want = fn(*f32(q, k, v), implementation="xla")
    assert relerr(out, want) < 1e-2
    ct = jax.random.normal(jax.random.key(5), q.shape, jnp.float32)
    loss = lambda *a, **o: jnp.sum(fn(*a, **o).astype(jnp.float32) * ct)
    got = jax.jit(jax.grad(lambda *a: loss(*a, implementation="pallas"), argnums=(0, 1, 2)))(q, k, v)
    ref = jax.grad(lambda *a: loss(*a, implementation="xla"), argnums=(0, 1, 2))(*f32(q, k, v))
    for g, r in zip(got, ref):
        assert relerr(g, r) < 2e-2


def test_linear_is_stable_at_131072_tokens():
    q, k, v = qkv(1, 131072, 4, 2, 128, seed=3)
    out, state = jax.jit(lambda *a: pk.linear_attention(*a, implementation="pallas"))(q, k, v)
    want, want_state = pk.linear_attention(*f32(q, k, v), implementation="xla")
    assert relerr(out, want) < 1e-2
    assert relerr(state.kv, want_state.kv) < 1e-2
