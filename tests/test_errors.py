"""Bad arguments and inputs raise ValueError/TypeError naming the argument and what is allowed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels as pk
from complexity_jax import CUDA


@pytest.mark.parametrize(
    "factory,kwargs,error,match",
    [
        ("flash", dict(hidden_size=32, num_heads=4, num_kv_heads=3), ValueError, "num_kv_heads"),
        ("flash", dict(hidden_size=30, num_heads=4), ValueError, "hidden_size"),
        ("flash", dict(hidden_size=0, num_heads=4), ValueError, "hidden_size"),
        ("flash", dict(hidden_size=32, num_heads=-1), ValueError, "num_heads"),
        ("flash", dict(hidden_size=32, num_heads=4, implementation="cuda"), ValueError, "implementation"),
        ("flash", dict(hidden_size=32, num_heads=4, head_dim=5), ValueError, "head_dim"),
        ("flash", dict(hidden_size=32.0, num_heads=4), TypeError, "hidden_size"),
        ("sliding_window", dict(hidden_size=32, num_heads=4, window_size=0), ValueError, "window_size"),
        ("linear", dict(hidden_size=32, num_heads=4, feature_map="tanh"), ValueError, "feature_map"),
        ("multiscale", dict(hidden_size=32, num_heads=4, local_heads=5), ValueError, "local_heads"),
        ("multiscale", dict(hidden_size=32, num_heads=4, local_heads=-1), ValueError, "local_heads"),
        ("multiscale", dict(hidden_size=32, num_heads=4, window_sizes=(4, 0)), ValueError, "window_sizes"),
        ("sparse", dict(hidden_size=32, num_heads=4, block_size=0), ValueError, "block_size"),
        ("sparse", dict(hidden_size=32, num_heads=4, num_local_blocks=0), ValueError, "num_local_blocks"),
    ],
)
def test_bad_layer_arguments(factory, kwargs, error, match):
    with pytest.raises(error, match=match):
        getattr(CUDA, factory)(**kwargs)


def test_unknown_attn_type():
    with pytest.raises(ValueError, match="attn_type"):
        CUDA.create(attn_type="dense", hidden_size=32, num_heads=4)


@pytest.mark.parametrize("shape", [(2, 5), (2, 5, 16), (1, 2, 5, 32)])
def test_bad_input_shape(shape):
    attn = CUDA.flash(hidden_size=32, num_heads=4)
    params = attn.init(jax.random.key(0), jnp.zeros((1, 3, 32)))
    with pytest.raises(ValueError, match="hidden_size=32"):
        attn.apply(params, jnp.ones(shape))


def test_cache_of_another_batch_size():
    attn = CUDA.flash(hidden_size=32, num_heads=4)
    params = attn.init(jax.random.key(0), jnp.zeros((1, 3, 32)))
    with pytest.raises(ValueError, match="batch"):
        attn.apply(params, jnp.ones((2, 1, 32)), cache=attn.init_cache(3, 8))


def test_bad_init_cache_sizes():
    attn = CUDA.flash(hidden_size=32, num_heads=4)
    with pytest.raises(ValueError, match="max_length"):
        attn.init_cache(batch_size=1, max_length=0)


def ones(*shape):
    return jnp.ones(shape, jnp.float32)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: pk.flash_attention(ones(1, 4, 3, 8), ones(1, 4, 2, 8), ones(1, 4, 2, 8)), ValueError, "multiple"),
        (lambda: pk.flash_attention(ones(4, 3, 8), ones(4, 3, 8), ones(4, 3, 8)), ValueError, "rank 4"),
        (lambda: pk.flash_attention(ones(1, 4, 2, 8), ones(1, 3, 2, 8), ones(1, 3, 2, 8)), ValueError, "q_len"),
        (lambda: pk.flash_attention(ones(1, 4, 2, 8), ones(1, 4, 2, 8), ones(1, 4, 2, 8), window_size=0), ValueError, "window_size"),
        (lambda: pk.flash_attention(ones(1, 4, 2, 8), ones(1, 4, 2, 8), ones(1, 4, 2, 8), implementation="fast"), ValueError, "implementation"),
        (lambda: pk.multiscale_attention(ones(1, 4, 2, 8), ones(1, 4, 2, 8), ones(1, 4, 2, 8), (3,)), ValueError, "window_sizes"),
        (lambda: pk.multiscale_attention(ones(1, 4, 2, 8), ones(1, 4, 2, 8), ones(1, 4, 2, 8), 3), TypeError, "window_sizes"),
        (lambda: pk.linear_attention(ones(1, 4, 2, 8), ones(1, 4, 2, 8), ones(1, 4, 2, 8), "exp"), ValueError, "feature_map"),
        (lambda: pk.decode_attention(ones(2, 1, 2, 8), ones(2, 4, 2, 8), ones(2, 4, 2, 8), jnp.array([1])), ValueError, "lengths"),
        (lambda: pk.sparse_attention(ones(1, 4, 2, 8), ones(1, 4, 2, 8), ones(1, 4, 2, 8), block_size=-4), ValueError, "block_size"),
    ],
)
def test_bad_op_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()
