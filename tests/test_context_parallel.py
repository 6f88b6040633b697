"""Context parallelism on 2, 4 and 8 host devices: the sharded ops equal the unsharded ones, forward and gradients.

The sequence is sharded in contiguous blocks over the mesh axis ``"seq"``; the ops run inside ``jax.shard_map``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import pallas_kernels as pk
from tests.conftest import relerr

SEQ = P(None, "seq")


def _mesh(n: int):
    if jax.device_count() < n:
        pytest.skip(f"needs {n} devices (XLA_FLAGS=--xla_force_host_platform_device_count=8), has {jax.device_count()}")
    return jax.sharding.Mesh(np.array(jax.devices()[:n]), ("seq",))


def _qkv(seq_len, heads=4, kv_heads=2, head_dim=16, seed=0):
    rng = np.random.default_rng(seed)
    make = lambda h: jnp.asarray(rng.standard_normal((2, seq_len, h, head_dim)), jnp.float32)
    return make(heads), make(kv_heads), make(kv_heads), make(heads)


def _sharded(fn, mesh, check_vma=True):
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(SEQ,) * 3, out_specs=SEQ, check_vma=check_vma))


def _check(sharded, unsharded, q, k, v, ct, mesh, tol=1e-5):
    put = lambda x: jax.device_put(x, NamedSharding(mesh, SEQ))
    assert relerr(sharded(*map(put, (q, k, v))), unsharded(q, k, v)) < tol
    loss = lambda f: lambda *a: jnp.sum(f(*a) * ct)
    got = jax.grad(loss(sharded), argnums=(0, 1, 2))(*map(put, (q, k, v)))
    want = jax.grad(loss(unsharded), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        assert relerr(g, w) < tol


CASES = {
    "causal": dict(causal=True),
    "full": dict(causal=False),
    "window_inside_block": dict(causal=True, window_size=5),
    "window_spans_blocks": dict(causal=True, window_size=19),
}


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("case", list(CASES))
def test_softmax_context_parallel_equals_unsharded_xla(n, case):
    mesh, kwargs = _mesh(n), CASES[case]
    q, k, v, ct = _qkv(8 * n)
    sharded = _sharded(functools.partial(pk.context_parallel_attention, axis_name="seq", implementation="xla",
                                         **kwargs), mesh)
    unsharded = functools.partial(pk.flash_attention, implementation="xla", **kwargs)
    _check(sharded, unsharded, q, k, v, ct, mesh)


@pytest.mark.parametrize("case", ["causal", "window_spans_blocks"])
def test_softmax_context_parallel_pallas_interpret(case):
    """The Triton kernels (interpret mode) in the ring; JAX's Pallas interpreter fails under check_vma (its padding
    constant is not marked varying), so this runs with ``check_vma=False``."""
    mesh, kwargs = _mesh(4), CASES[case]
    q, k, v, ct = _qkv(32, seed=1)
    sharded = _sharded(functools.partial(pk.context_parallel_attention, axis_name="seq", implementation="pallas",
                                         interpret=True, **kwargs), mesh, check_vma=False)
    unsharded = functools.partial(pk.flash_attention, implementation="xla", **kwargs)
    _check(sharded, unsharded, q, k, v, ct, mesh, tol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n", [2, 8])
def test_linear_context_parallel_equals_unsharded(n, causal):
    mesh = _mesh(n)
    q, k, v, ct = _qkv(8 * n, seed=2)
    local = functools.partial(pk.context_parallel_linear_attention, causal=causal, axis_name="seq",
                              implementation="xla")
    sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(SEQ,) * 3, out_specs=(SEQ, P())))
    whole = functools.partial(pk.linear_attention, causal=causal, implementation="xla")
    put = lambda x: jax.device_put(x, NamedSharding(mesh, SEQ))
    (out, state), (want, want_state) = sharded(*map(put, (q, k, v))), whole(q, k, v)
    assert relerr(out, want) < 1e-5
    for s, w in zip(state, want_state):
        assert relerr(s, w) < 1e-5
    got = jax.grad(lambda *a: jnp.sum(sharded(*a)[0] * ct), argnums=(0, 1, 2))(*map(put, (q, k, v)))
    ref = jax.grad(lambda *a: jnp.sum(whole(*a)[0] * ct), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got, ref):
        assert relerr(g, r) < 1e-5


def test_context_parallel_rejects_what_it_cannot_compute():
    mesh = _mesh(2)
    q, k, v, _ = _qkv(16)
    call = lambda **kw: _sharded(functools.partial(pk.context_parallel_attention, axis_name="seq", **kw), mesh)(q, k, v)
    with pytest.raises(NotImplementedError, match="window_size with causal=True"):
        call(causal=False, window_size=4)
    with pytest.raises(ValueError, match="window_size must be a positive int"):
        call(window_size=0)
