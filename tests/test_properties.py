"""Property-based tests (Hypothesis): drawn shapes, GQA ratios, windows, sparse layouts, chunkings, dtypes and scales.

Each op is compared with the float64 references of ``tests/naive.py`` (written from the definitions, independently of
``pallas_kernels.reference``): many draws on the XLA path, fewer through the Pallas kernels in interpret mode.

Profiles (``HYPOTHESIS_PROFILE``): ``ci`` (default; derandomized, 8 examples per XLA property, 3 per kernel or
layer property, about two CPU-minutes) and ``long`` (hundreds of random examples, for local runs:
``HYPOTHESIS_PROFILE=long pytest tests/test_properties.py``).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pallas_kernels as pk
from complexity_jax import CUDA
from tests import naive
from tests.conftest import relerr

# Hypothesis runs of the same code on every JAX: CI keeps them to its Python 3.11 leg (README, "Tests").
pytestmark = pytest.mark.slow

settings.register_profile(
    "ci", max_examples=8, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("long", max_examples=300, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
# Interpret mode traces and runs a kernel per drawn shape: a quarter of the draws.
KERNEL_SETTINGS = settings(max_examples=max(3, settings.default.max_examples // 4))

XLA = {"implementation": "xla"}
PALLAS = {"implementation": "pallas", "interpret": True}
TOL = {jnp.float32: 3e-5, jnp.bfloat16: 3e-2}


class Attention:
    """A drawn softmax-attention call: shapes, dtype, scale, causality, one window per query head."""

    def __init__(self, draw, head_dims, dtypes, same_length: bool):
        self.batch = draw(st.integers(1, 2))
        self.kv_heads = draw(st.integers(1, 2))
        self.heads = self.kv_heads * draw(st.integers(1, 3))
        self.head_dim = draw(st.sampled_from(head_dims))
        self.kv_len = draw(st.integers(1, 24))
        self.causal = draw(st.booleans())
        # Non-causal queries may outnumber the keys (the first ones then sit before position 0).
        self.q_len = self.kv_len if same_length else draw(
            st.integers(1, self.kv_len if self.causal else self.kv_len + 4))
        self.windows = draw(st.lists(st.none() | st.integers(1, self.kv_len + 2), min_size=self.heads,
                                     max_size=self.heads))
        self.scale = draw(st.none() | st.sampled_from([0.0, -0.6, 0.05, 1.5]))
        self.dtype = draw(st.sampled_from(dtypes))
        rng = np.random.default_rng(draw(st.integers(0, 2**16)))
        make = lambda *shape: jnp.asarray(rng.standard_normal(shape), self.dtype)
        self.q = make(self.batch, self.q_len, self.heads, self.head_dim)
        self.k = make(self.batch, self.kv_len, self.kv_heads, self.head_dim)
        self.v = make(self.batch, self.kv_len, self.kv_heads, self.head_dim)

    def want(self, mask) -> np.ndarray:
        return naive.softmax_attention(self.q, self.k, self.v, mask, self.scale)


@st.composite
def attention_calls(draw, head_dims=(4, 8, 16), dtypes=(jnp.float32, jnp.bfloat16), same_length=False):
    return Attention(draw, head_dims, dtypes, same_length)


def check_window_ops(a: Attention, impl: dict) -> None:
    mask = naive.window_mask(a.q_len, a.kv_len, a.windows, a.causal)
    got = pk.multiscale_attention(a.q, a.k, a.v, a.windows, a.causal, softmax_scale=a.scale, **impl)
    assert got.dtype == a.dtype and relerr(got, a.want(mask)) < TOL[a.dtype]
    window = a.windows[0]
    got = pk.flash_attention(a.q, a.k, a.v, a.causal, window, softmax_scale=a.scale, **impl)
    mask = naive.window_mask(a.q_len, a.kv_len, [window] * a.heads, a.causal)
    assert relerr(got, a.want(mask)) < TOL[a.dtype]


@given(attention_calls())
def test_flash_window_and_multiscale_xla(a):
    check_window_ops(a, XLA)


@KERNEL_SETTINGS
@given(attention_calls(head_dims=(16, 24)))
def test_flash_window_and_multiscale_kernels(a):
    check_window_ops(a, PALLAS)


@st.composite
def sparse_calls(draw, head_dims=(4, 8, 16)):
    a = draw(attention_calls(head_dims))
    layout = dict(block_size=draw(st.sampled_from([2, 4, 8])), num_global_tokens=draw(st.integers(0, 2)),
                  num_local_blocks=draw(st.integers(1, 3)), num_random_blocks=draw(st.integers(0, 2)),
                  seed=draw(st.integers(0, 9)), causal=a.causal)
    a.q = a.q[:, -min(a.q_len, a.kv_len):]  # sparse queries are the last q_len <= kv_len positions
    a.q_len = a.q.shape[1]
    return a, layout


def check_sparse(call, impl: dict) -> None:
    a, layout = call
    got = pk.sparse_attention(a.q, a.k, a.v, **layout, softmax_scale=a.scale, **impl)
    mask = pk.sparse_mask(a.kv_len, a.heads, **layout)[:, a.kv_len - a.q_len:]
    assert relerr(got, a.want(mask)) < TOL[a.dtype]


@given(sparse_calls())
def test_sparse_xla(call):
    check_sparse(call, XLA)


@KERNEL_SETTINGS
@given(sparse_calls(head_dims=(16,)))
def test_sparse_kernels(call):
    check_sparse(call, PALLAS)


@st.composite
def decode_calls(draw, head_dims=(4, 8, 16)):
    """A decode step against a cache whose unused slots hold NaN (they must never reach an output)."""
    a = draw(attention_calls(head_dims, dtypes=(jnp.float32,)))
    t = draw(st.integers(1, min(3, a.kv_len)))
    lengths = np.array(draw(st.lists(st.integers(t, a.kv_len), min_size=a.batch, max_size=a.batch)))
    unused = np.arange(a.kv_len)[None, :, None, None] >= lengths[:, None, None, None]
    a.k, a.v = (jnp.where(unused, jnp.nan, x) for x in (a.k, a.v))
    return a, a.q[:, :t], lengths


def check_decode(call, impl: dict) -> None:
    a, q, lengths = call
    got = pk.decode_attention(q, a.k, a.v, jnp.asarray(lengths), a.windows, softmax_scale=a.scale, **impl)
    mask = naive.cache_mask(lengths, q.shape[1], a.kv_len, a.windows)
    clean = lambda x: jnp.nan_to_num(x, nan=0.0)
    want = naive.softmax_attention(q, clean(a.k), clean(a.v), mask, a.scale)
    assert relerr(got, want) < TOL[jnp.float32]


@given(decode_calls())
def test_decode_xla(call):
    check_decode(call, XLA)


@KERNEL_SETTINGS
@given(decode_calls(head_dims=(16, 24)))
def test_decode_kernel(call):
    check_decode(call, PALLAS)


@st.composite
def linear_calls(draw, head_dims=(4, 8, 16)):
    a = draw(attention_calls(head_dims, dtypes=(jnp.float32, jnp.bfloat16, jnp.float16), same_length=True))
    magnitude = draw(st.sampled_from([1.0, 30.0]))
    a.q, a.k = a.q * magnitude, a.k * magnitude
    cuts = sorted(draw(st.sets(st.integers(1, a.kv_len - 1), max_size=3))) if a.kv_len > 1 else []
    return a, draw(st.sampled_from(["elu", "relu", "softmax"])), [0, *cuts, a.kv_len]


def check_linear(call, impl: dict) -> None:
    """Chunks carried through the state equal the whole sequence of the float64 reference."""
    a, feature_map, bounds = call
    if a.causal:
        outs, state = [], None
        for start, stop in zip(bounds[:-1], bounds[1:]):
            piece = lambda x: x[:, start:stop]
            out, state = pk.linear_attention(piece(a.q), piece(a.k), piece(a.v), feature_map, True, state, **impl)
            outs.append(out)
        out = jnp.concatenate(outs, axis=1)
    else:  # non-causal attention sums over the whole sequence: one call
        out, state = pk.linear_attention(a.q, a.k, a.v, feature_map, False, **impl)
    want, kv, k_sum = naive.linear_attention(a.q, a.k, a.v, feature_map, a.causal)
    full = a.dtype == jnp.float32
    assert out.dtype == a.dtype
    assert relerr(out, want) < (3e-5 if full else 3e-2)
    # The float32 state sums products of phi(k) and v rounded to the input dtype (the kernels' dot operands).
    assert relerr(state.kv, kv) < (1e-4 if full else 1e-2) and relerr(state.k_sum, k_sum) < (1e-4 if full else 1e-2)


@given(linear_calls())
def test_linear_xla(call):
    check_linear(call, XLA)


@KERNEL_SETTINGS
@given(linear_calls(head_dims=(16,)))
def test_linear_kernels(call):
    check_linear(call, PALLAS)


FORMS = {
    "flash": {},
    "sliding_window": {"window_size": 3},
    "sparse": {"block_size": 2, "num_random_blocks": 1},
    "linear": {},
    "multiscale": {"local_heads": 2, "window_sizes": (2, 4)},
}


@settings(max_examples=max(3, settings.default.max_examples // 3))
@given(form=st.sampled_from(list(FORMS)), kv_heads=st.sampled_from([1, 2, 4]),
       cuts=st.sets(st.integers(1, 10), max_size=4), preallocate=st.booleans())
def test_layer_continuation_equals_the_whole_sequence(form, kv_heads, cuts, preallocate):
    attn = CUDA.create(attn_type=form, hidden_size=32, num_heads=4, num_kv_heads=kv_heads, implementation="xla",
                       **FORMS[form])
    x = jnp.asarray(np.random.default_rng(len(cuts)).standard_normal((2, 11, 32)), jnp.float32)
    params = attn.init(jax.random.key(0), x)
    whole, _ = attn.apply(params, x)
    bounds = [0, *sorted(cuts), 11]
    cache = attn.init_cache(2, 11) if preallocate else None
    outs = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        out, cache = attn.apply(params, x[:, start:stop], cache=cache)
        outs.append(out)
    assert relerr(jnp.concatenate(outs, axis=1), whole) < 1e-5
