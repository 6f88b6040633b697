"""Linear attention against a float64 quadratic reference: outputs, states, carry, gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import pallas_kernels as pk
from tests import naive
from tests.conftest import relerr, x64
from tests.test_softmax_ops import run_or_skip


def qkv(rng, b, s, h, kvh, d, dtype=jnp.float32):
    make = lambda *shape: jnp.asarray(rng.standard_normal(shape) * 0.5, dtype)
    return make(b, s, h, d), make(b, s, kvh, d), make(b, s, kvh, d)


@pytest.mark.parametrize("feature_map", ["elu", "relu", "softmax"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("length", [1, 16, 37])
def test_matches_quadratic_reference(impl, rng, feature_map, causal, length):
    q, k, v = qkv(rng, 2, length, 4, 2, 16)
    out, state = run_or_skip(lambda: pk.linear_attention(q, k, v, feature_map, causal, **impl))
    want, kv, ksum = naive.linear_attention(q, k, v, feature_map, causal)
    tol = 1e-3 if feature_map == "relu" else 1e-4  # relu rows can have a tiny normaliser
    assert relerr(out, want) < tol
    assert state.kv.dtype == jnp.float32 and relerr(state.kv, kv) < 1e-5 and relerr(state.k_sum, ksum) < 1e-5


@pytest.mark.parametrize("feature_map", ["elu", "softmax"])
def test_two_calls_equal_one(impl, rng, feature_map):
    q, k, v = qkv(rng, 1, 41, 4, 2, 16)
    whole, whole_state = run_or_skip(lambda: pk.linear_attention(q, k, v, feature_map, **impl))
    first, state = pk.linear_attention(q[:, :23], k[:, :23], v[:, :23], feature_map, **impl)
    second, state = pk.linear_attention(q[:, 23:], k[:, 23:], v[:, 23:], feature_map, initial_state=state, **impl)
    assert relerr(jnp.concatenate([first, second], 1), whole) < 1e-5
    assert relerr(state.kv, whole_state.kv) < 1e-5


def test_bf16_inputs_accumulate_in_float32(impl, rng):
    q, k, v = qkv(rng, 1, 50, 2, 1, 16, jnp.bfloat16)
    out, _ = run_or_skip(lambda: pk.linear_attention(q, k, v, **impl))
    assert out.dtype == jnp.bfloat16
    assert relerr(out, naive.linear_attention(q, k, v, "elu", True)[0]) < 2e-2


@pytest.mark.parametrize("feature_map", ["elu", "softmax"])
def test_xla_gradients_match_finite_differences(rng, feature_map):
    with x64():
        q, k, v = qkv(rng, 1, 9, 2, 1, 4, jnp.float64)
        s0 = pk.LinearState(jnp.eye(4)[None, None] * 0.3, jnp.ones((1, 1, 4)) * 0.2)

        def f(a, b, c, kv, ks):
            out, state = pk.linear_attention(a, b, c, feature_map, initial_state=pk.LinearState(kv, ks),
                                             implementation="xla")
            return out, state.kv

        check_grads(f, (q, k, v, *s0), order=1, modes=["rev"])


@pytest.mark.parametrize("causal", [True, False])
def test_gradients_match_xla_gradients(impl, rng, causal):
    q, k, v = qkv(rng, 2, 21, 4, 2, 16)
    state = pk.LinearState(jnp.asarray(rng.random((2, 2, 16, 16)), jnp.float32),
                           jnp.asarray(rng.random((2, 2, 16)), jnp.float32))
    ct = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    ct_kv = jnp.asarray(rng.standard_normal(state.kv.shape), jnp.float32)

    def loss(a, b, c, s, **o):
        out, new = pk.linear_attention(a, b, c, "elu", causal, s, **o)
        return jnp.sum(out * ct) + jnp.sum(new.kv * ct_kv) + jnp.sum(new.k_sum)

    got = run_or_skip(lambda: jax.grad(lambda *a: loss(*a, **impl), argnums=(0, 1, 2, 3))(q, k, v, state))
    want = jax.grad(lambda *a: loss(*a, implementation="xla"), argnums=(0, 1, 2, 3))(q, k, v, state)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert relerr(g, w) < 1e-4


def test_state_shape_is_constant_in_length(rng):
    for length in (5, 500):
        q, k, v = qkv(rng, 1, length, 4, 2, 8)
        _, state = pk.linear_attention(q, k, v, implementation="xla")
        assert state.kv.shape == (1, 2, 8, 8) and state.k_sum.shape == (1, 2, 8)
