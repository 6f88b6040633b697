"""Context parallelism on 2, 4 and 8 host devices: the sharded ops equal the unsharded ones, forward and gradients.

The sequence is sharded in contiguous blocks over the mesh axis ``"seq"`` (or reordered into the zigzag layout first,
``layout="zigzag"``); the ops run inside ``jax.shard_map``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.extend.core import jaxprs_in_params
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


def _zigzagged(sharded, n):
    """``sharded`` (zigzag layout) as a function of the sequence in order: reorder, shard, run, gather, order back."""
    return lambda *qkv: pk.from_zigzag(sharded(*(pk.to_zigzag(x, n) for x in qkv)), n)


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("case", ["causal", "full"])
def test_softmax_context_parallel_zigzag_equals_unsharded_xla(n, case):
    mesh, kwargs = _mesh(n), CASES[case]
    q, k, v, ct = _qkv(8 * n, seed=3)
    sharded = _sharded(functools.partial(pk.context_parallel_attention, axis_name="seq", layout="zigzag",
                                         implementation="xla", **kwargs), mesh)
    unsharded = functools.partial(pk.flash_attention, implementation="xla", **kwargs)
    _check(_zigzagged(sharded, n), unsharded, q, k, v, ct, mesh)


def test_softmax_context_parallel_zigzag_odd_heads_xla():
    """Three query heads sharing one KV head, local length 6 (chunks of 3)."""
    mesh = _mesh(4)
    q, k, v, ct = _qkv(24, heads=3, kv_heads=1, seed=4)
    sharded = _sharded(functools.partial(pk.context_parallel_attention, axis_name="seq", layout="zigzag",
                                         implementation="xla"), mesh)
    _check(_zigzagged(sharded, 4), functools.partial(pk.flash_attention, implementation="xla"), q, k, v, ct, mesh)


def test_softmax_context_parallel_zigzag_pallas_interpret():
    """As ``test_softmax_context_parallel_pallas_interpret``, in the zigzag layout (blocks of 8 x 4 and 4 x 8)."""
    mesh = _mesh(4)
    q, k, v, ct = _qkv(32, seed=5)
    sharded = _sharded(functools.partial(pk.context_parallel_attention, axis_name="seq", layout="zigzag",
                                         implementation="pallas", interpret=True), mesh, check_vma=False)
    unsharded = functools.partial(pk.flash_attention, implementation="xla")
    _check(_zigzagged(sharded, 4), unsharded, q, k, v, ct, mesh, tol=1e-4)


def test_zigzag_layout_helpers():
    # 16 positions on 2 devices: chunks of 4; device 0 holds chunks 0 and 3, device 1 chunks 1 and 2.
    np.testing.assert_array_equal(pk.zigzag_order(16, 2), [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11])
    np.testing.assert_array_equal(pk.zigzag_order(8, 4), [0, 7, 1, 6, 2, 5, 3, 4])
    np.testing.assert_array_equal(pk.zigzag_order(6, 1), np.arange(6))
    x = np.arange(2 * 24 * 3).reshape(2, 24, 3)
    for n in (1, 2, 3, 4):
        z = pk.to_zigzag(x, n)
        assert isinstance(z, np.ndarray)
        np.testing.assert_array_equal(z, x[:, pk.zigzag_order(24, n)])
        np.testing.assert_array_equal(pk.from_zigzag(z, n), x)
        np.testing.assert_array_equal(pk.from_zigzag(pk.to_zigzag(jnp.asarray(x), n), n), x)
        np.testing.assert_array_equal(pk.to_zigzag(x.swapaxes(0, 1), n, axis=0), z.swapaxes(0, 1))
        np.testing.assert_array_equal(pk.to_zigzag(x.swapaxes(1, 2), n, axis=-1), z.swapaxes(1, 2))


def _matmul_flops(jaxpr) -> int:
    """FLOPs of the matrix products in ``jaxpr`` (dot_generals with free dimensions on both operands: the block
    products, not per-row reductions), sub-jaxprs included once (a loop body counts one iteration)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
            lhs, rhs = (x.aval.shape for x in eqn.invars)
            if len(lhs) > len(lc) + len(lb) and len(rhs) > len(rc) + len(rb):
                total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod([lhs[i] for i in lc]))
        total += sum(_matmul_flops(sub) for sub in jaxprs_in_params(eqn.params))
    return total


def _ring_branches(jaxpr, in_loop=False):
    """Matrix-product FLOPs of each branch of every ``cond`` inside a loop: one list per ring step's choice."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "cond" and in_loop:
            yield [_matmul_flops(branch.jaxpr) for branch in eqn.params["branches"]]
        for sub in jaxprs_in_params(eqn.params):
            yield from _ring_branches(sub, in_loop or eqn.primitive.name in ("scan", "while"))


@pytest.mark.parametrize("n", [2, 4, 8])
def test_zigzag_balances_the_causal_ring(n):
    """At every ring step a device either computes with the received block or not, as the traced program's ``cond``
    decides from its index. Contiguous causal: one branch is a whole block product, the other nothing (device ``r``
    computes at ``r`` of the ``n - 1`` steps). Zigzag: both branches are half of that block product, so every device
    does the same work at every step, forward and backward."""
    mesh = _mesh(n)
    q, k, _, _ = _qkv(8 * n)

    def branches(layout):
        local = functools.partial(pk.context_parallel_attention, axis_name="seq", layout=layout, implementation="xla")
        fn = jax.shard_map(local, mesh=mesh, in_specs=(SEQ,) * 3, out_specs=SEQ)
        loss = lambda *a: jnp.sum(fn(*a))
        return list(_ring_branches(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, k).jaxpr))

    contiguous, zigzag = branches("contiguous"), branches("zigzag")
    assert len(contiguous) == len(zigzag) == 2  # the forward's ring and the backward's
    for (nothing, block), (earlier, later) in zip(contiguous, zigzag):
        assert nothing == 0 and block > 0
        assert earlier == later == block // 2


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
    with pytest.raises(ValueError, match="layout must be one of \\('contiguous', 'zigzag'\\), got 'ring'"):
        call(layout="ring")
    with pytest.raises(ValueError, match="layout='zigzag'.*window_size=4.*layout='contiguous'"):
        call(layout="zigzag", window_size=4)
    odd = _sharded(functools.partial(pk.context_parallel_attention, axis_name="seq", layout="zigzag"), mesh)
    with pytest.raises(ValueError, match="local length L must be even, got 3"):
        odd(*_qkv(6)[:3])
    with pytest.raises(ValueError, match="seq_len must be a multiple of it, got seq_len=12"):
        pk.zigzag_order(12, 4)
    with pytest.raises(ValueError, match="num_devices must be a positive int, got 0"):
        pk.to_zigzag(np.zeros((1, 8)), 0)
    with pytest.raises(TypeError, match="num_devices must be an int"):
        pk.zigzag_order(8, 2.0)
    with pytest.raises(ValueError, match="axis must be in \\[-2, 2\\)"):
        pk.from_zigzag(np.zeros((1, 8)), 2, axis=2)
