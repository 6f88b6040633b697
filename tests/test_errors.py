"""Bad arguments and inputs raise ValueError/TypeError naming the argument and what is allowed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from complexity_jax import CUDA, KVCache


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


# Issue 17: inputs that were silently accepted, or failed deep in JAX, raise a clear error naming the argument.
q4 = ones(1, 4, 2, 8)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: pk.flash_attention(*(jnp.ones((1, 4, 2, 8), jnp.int32),) * 3), TypeError, "q must be a floating-point array.*int32"),
        (lambda: pk.linear_attention(*(jnp.ones((1, 4, 2, 8), jnp.complex64),) * 3), TypeError, "q must be a floating-point array.*complex64"),
        (lambda: pk.flash_attention(q4, q4, q4, window_size=4.0), TypeError, "window_size must be an int, got 4.0 of type float"),
        (lambda: pk.flash_attention(q4, q4, q4, window_size="4"), TypeError, "window_size must be an int, got '4'"),
        (lambda: pk.multiscale_attention(q4, q4, q4, (2, 2.5)), TypeError, r"window_sizes\[1\] must be an int, got 2.5"),
        (lambda: pk.flash_attention(q4, q4, q4, softmax_scale="0.1"), TypeError, "softmax_scale must be a real number or None, got '0.1'"),
        (lambda: pk.flash_attention(q4, q4, q4, causal="no"), TypeError, "causal must be a bool.*'no'"),
        (lambda: pk.flash_attention(q4, q4, q4, interpret=1), TypeError, "interpret must be a bool"),
        (lambda: pk.flash_attention(ones(1, 0, 2, 8), ones(1, 0, 2, 8), ones(1, 0, 2, 8)), ValueError, r"q has an empty axis, shape \(1, 0, 2, 8\)"),
        (lambda: pk.linear_attention(ones(0, 4, 2, 16), ones(0, 4, 2, 16), ones(0, 4, 2, 16)), ValueError, "q has an empty axis"),
        (lambda: pk.sparse_attention(q4, q4, q4, block_size=2, seed=-1), ValueError, "seed must be a non-negative int, got -1"),
        (lambda: pk.sparse_attention(q4, q4, q4, block_size=2, seed=1.5), TypeError, "seed must be an int"),
        (lambda: pk.sparse_attention(q4, q4, q4, block_size=2, kernel_config="fast"), TypeError, "kernel_config must be a KernelConfig"),
        (lambda: pk.decode_attention(ones(2, 1, 2, 8), ones(2, 4, 2, 8), ones(2, 4, 2, 8), jnp.array([1, 5])), ValueError, r"lengths must lie in \[0, capacity=4\].*\[1, 5\]"),
        (lambda: pk.decode_attention(ones(2, 1, 2, 8), ones(2, 4, 2, 8), ones(2, 4, 2, 8), jnp.array([-1, 2])), ValueError, r"lengths must lie in \[0, capacity=4\]"),
        (lambda: pk.decode_attention(ones(2, 1, 2, 8), ones(2, 4, 2, 8), ones(2, 4, 2, 8), jnp.array([1.0, 2.0])), TypeError, "lengths must be an integer array .*, got dtype float32"),
        (lambda: pk.decode_attention(ones(2, 1, 2, 8), ones(2, 4, 2, 8), ones(2, 4, 2, 8), jnp.array([1, 2]), kernel_config=3), TypeError, "kernel_config must be a DecodeConfig"),
        (lambda: pk.flash_attention(q4.astype(jnp.float16), q4.astype(jnp.float16), q4.astype(jnp.float16), implementation="pallas_triton", softmax_scale=float("inf")), ValueError, "softmax_scale must be finite"),
    ],
)
def test_bad_inputs_are_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_float64_inputs_need_the_xla_path():
    with jax.enable_x64(True):
        q = jnp.ones((1, 4, 2, 16), jnp.float64)
        with pytest.raises(NotImplementedError, match="the Pallas kernels take float16, bfloat16, float32, got float64"):
            pk.flash_attention(q, q, q, implementation="pallas", interpret=True)
        assert pk.flash_attention(q, q, q, implementation="auto").dtype == jnp.float64


def test_traced_static_arguments_are_named():
    with pytest.raises(TypeError, match="window_size must be a static Python int.*traced value.*static_argnames"):
        jax.jit(lambda w: pk.flash_attention(q4, q4, q4, window_size=w))(3)
    with pytest.raises(TypeError, match="softmax_scale must be a static Python float.*traced value"):
        jax.jit(lambda s: pk.flash_attention(q4, q4, q4, softmax_scale=s))(0.5)


@pytest.mark.parametrize(
    "factory,kwargs,error,match",
    [
        ("flash", dict(causal="no"), TypeError, "causal must be a bool.*'no'"),
        ("flash", dict(use_rope=1), TypeError, "use_rope must be a bool"),
        ("flash", dict(rope_theta=True), TypeError, "rope_theta must be a real number, got True"),
        ("flash", dict(rope_theta=float("inf")), ValueError, "rope_theta must be a finite number > 0"),
        ("flash", dict(dtype=jnp.int32), TypeError, "dtype must be a floating-point dtype.*'int32'"),
        ("flash", dict(param_dtype="complex64"), TypeError, "param_dtype must be a floating-point dtype"),
        ("flash", dict(param_dtype=None), TypeError, "param_dtype must be a floating-point dtype.*got None"),
        ("sliding_window", dict(window_size=4.0), TypeError, "window_size must be an int, got 4.0"),
        ("sparse", dict(seed=-1), ValueError, "seed must be a non-negative int, got -1"),
        ("multiscale", dict(window_sizes=(4, 2.0)), TypeError, r"window_sizes\[1\] must be an int"),
    ],
)
def test_bad_layer_settings_are_named(factory, kwargs, error, match):
    with pytest.raises(error, match=match):
        getattr(CUDA, factory)(hidden_size=32, num_heads=4, **kwargs)


def test_numpy_integer_settings_are_accepted():
    attn = CUDA.sliding_window(hidden_size=32, num_heads=4, window_size=np.int64(3))
    want = CUDA.sliding_window(hidden_size=32, num_heads=4, window_size=3)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 6, 32)), jnp.float32)
    params = want.init(jax.random.key(0), x)
    assert np.array_equal(attn.apply(params, x)[0], want.apply(params, x)[0])


def layer_and_params(factory="flash", **kwargs):
    attn = getattr(CUDA, factory)(hidden_size=32, num_heads=4, num_kv_heads=2, implementation="xla", **kwargs)
    return attn, attn.init(jax.random.key(0), jnp.zeros((2, 3, 32)))


@pytest.mark.parametrize(
    "factory,kwargs,make_cache,error,match",
    [
        ("flash", {}, lambda: CUDA.flash(hidden_size=32, num_heads=4).init_cache(2, 8), ValueError,
         r"cache.keys has shape \(2, 8, 4, 8\), but this layer and input need \[batch=2, any, num_kv_heads=2, head_dim=8\]"),
        ("flash", {}, lambda: CUDA.flash(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=4).init_cache(2, 8),
         ValueError, "head_dim=8"),
        ("flash", {}, lambda: {"keys": jnp.zeros((2, 8, 2, 8))}, TypeError, "cache must be a KVCache.*got dict"),
        ("flash", {}, lambda: KVCache.zeros(2, 8, 2, 8, jnp.int32, False), TypeError, "cache.keys has dtype int32"),
        ("flash", {}, lambda: CUDA.linear(hidden_size=32, num_heads=4, num_kv_heads=2).init_cache(2, 8), TypeError,
         "cache must be a KVCache.*got LinearCache"),
        ("sliding_window", dict(window_size=4),
         lambda: CUDA.sliding_window(hidden_size=32, num_heads=4, num_kv_heads=2, window_size=6).init_cache(2, 8),
         ValueError, "window_size=4"),
        ("linear", {}, lambda: CUDA.linear(hidden_size=32, num_heads=4).init_cache(2, 8), ValueError,
         r"cache.state.kv has shape \(2, 4, 8, 8\).*num_kv_heads=2"),
        ("multiscale", dict(window_sizes=(2,)),
         lambda: CUDA.multiscale(hidden_size=32, num_heads=4, num_kv_heads=2, window_sizes=(3,)).init_cache(2, 8),
         ValueError, "cache has the multi-scale layout"),
    ],
)
def test_cache_of_other_settings_is_refused(factory, kwargs, make_cache, error, match):
    attn, params = layer_and_params(factory, **kwargs)
    with pytest.raises(error, match=match):
        attn.apply(params, jnp.ones((2, 1, 32)), cache=make_cache())


@pytest.mark.parametrize("x,error,match", [
    (jnp.ones((2, 3, 32), jnp.int32), TypeError, "x must be a floating-point array, got dtype int32"),
    (jnp.ones((2, 0, 32)), ValueError, r"x must have batch and seq of at least 1, got shape \(2, 0, 32\)"),
    (jnp.ones((0, 3, 32)), ValueError, "x must have batch and seq of at least 1"),
])
def test_bad_layer_input(x, error, match):
    attn, params = layer_and_params()
    with pytest.raises(error, match=match):
        attn.apply(params, x)


def test_init_cache_dtype_must_be_floating():
    with pytest.raises(TypeError, match="dtype must be a floating-point dtype.*'int32'"):
        CUDA.flash(hidden_size=32, num_heads=4).init_cache(1, 8, jnp.int32)


PALLAS = {"implementation": "pallas", "interpret": True}
AD_OPS = {
    "flash_attention": lambda q: pk.flash_attention(q, q, q, **PALLAS),
    "multiscale_attention": lambda q: pk.multiscale_attention(q, q, q, (4, None), **PALLAS),
    "sparse_attention": lambda q: pk.sparse_attention(q, q, q, block_size=8, **PALLAS),
    "linear_attention": lambda q: pk.linear_attention(q, q, q, **PALLAS)[0],
    "decode_attention": lambda q: pk.decode_attention(q[:, :1], q, q, jnp.array([16]), **PALLAS),
}
# What each message says the kernels differentiate: decode's kernel has no backward of its own ("auto" runs the XLA
# backward, a forced Pallas implementation raises), the others define first-order reverse mode.
DECODE_DEFINES = r"decode_attention: the Pallas kernel has no backward of its own \(with implementation='auto'"


def defines(op: str, others: str) -> str:
    return DECODE_DEFINES if op == "decode_attention" else f"{op}: the Pallas kernels define {others}"


@pytest.mark.parametrize("op", list(AD_OPS))
@pytest.mark.parametrize("under_jit", [False, True])
def test_forward_mode_through_the_kernels_is_named(op, under_jit):
    q = jnp.ones((1, 16, 2, 16))
    jvp = lambda q: jax.jvp(AD_OPS[op], (q,), (q,))
    match = defines(op, "reverse-mode derivatives only") + ".*forward mode.*implementation='xla'"
    with pytest.raises(NotImplementedError, match=match):
        (jax.jit(jvp) if under_jit else jvp)(q)


@pytest.mark.parametrize("op", list(AD_OPS))
def test_second_order_through_the_kernels_is_named(op):
    # Each message names the op being differentiated, not its family.
    q = jnp.ones((1, 16, 2, 16))
    grad = jax.grad(lambda q: AD_OPS[op](q).sum())
    match = defines(op, "first derivatives only") + ".*second derivatives.*implementation='xla'"
    with pytest.raises(NotImplementedError, match=match) as raised:
        jax.grad(lambda q: grad(q).sum())(q)
    assert " / " not in str(raised.value)
    with pytest.raises(NotImplementedError, match=match):
        jax.hessian(lambda q: AD_OPS[op](q).sum())(q)
