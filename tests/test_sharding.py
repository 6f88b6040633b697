"""Batch- and head-sharded inputs under ``jax.jit`` (8 host devices): each device computes its own shard, the results
and gradients equal the unsharded ones, and the compiled program gathers no activation. Inside ``shard_map`` with
``check_vma=True`` every op works on its local block."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import pallas_kernels as pk
from tests.conftest import relerr

PALLAS = {"implementation": "pallas", "interpret": True}


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))


def _arrays(heads=8, kv_heads=4, seq=24, batch=4, head_dim=16, seed=0):
    rng = np.random.default_rng(seed)
    make = lambda h: jnp.asarray(rng.standard_normal((batch, seq, h, head_dim)), jnp.float32)
    return make(heads), make(kv_heads), make(kv_heads)


OPS = {
    "flash": lambda q, k, v, **o: pk.flash_attention(q, k, v, **o),
    "linear": lambda q, k, v, **o: pk.linear_attention(q, k, v, **o)[0],
    # Ragged rows (20 and 13 filled slots, alternating) that stay the same when the batch is split in pairs.
    "decode": lambda q, k, v, **o: pk.decode_attention(q[:, -2:], k, v, 20 - 7 * (jnp.arange(q.shape[0]) % 2), **o),
    "window": lambda q, k, v, **o: pk.flash_attention(q, k, v, window_size=5, causal=False, **o),
    "multiscale": lambda q, k, v, **o: pk.multiscale_attention(q, k, v, (3, 7, None, 3, 5, None, None, 9), **o),
    "sparse": lambda q, k, v, **o: pk.sparse_attention(q, k, v, block_size=8, num_random_blocks=1, **o),
    "sparse_no_random": lambda q, k, v, **o: pk.sparse_attention(q, k, v, block_size=8, num_random_blocks=0, **o),
}
# Masks that differ between heads (multiscale, sparse random blocks) split their heads too: each device runs the mask
# of the global heads it holds.


def _gathers(compiled_text: str) -> int:
    return len(re.findall(r"\ball-gather(-start)?\(", compiled_text))


CASES = [(op, P("data", None, "model")) for op in OPS] + [("flash", P("data")), ("window", P(None, None, "model"))]


@pytest.mark.parametrize("op,spec", CASES, ids=[f"{op}-{spec}" for op, spec in CASES])
def test_sharded_jit_equals_unsharded_without_gathers(mesh, op, spec):
    fn = OPS[op]
    q, k, v = _arrays()
    ct = jnp.asarray(np.random.default_rng(1).standard_normal(fn(q, k, v, implementation="xla").shape), jnp.float32)
    sharding = NamedSharding(mesh, spec)
    qs, ks, vs = (jax.device_put(x, sharding) for x in (q, k, v))
    forward = jax.jit(functools.partial(fn, **PALLAS))
    out = forward(qs, ks, vs)
    assert relerr(out, fn(q, k, v, implementation="xla")) < 1e-5
    compiled = [forward.lower(qs, ks, vs).compile()]
    if op != "decode":  # forward only: its gradient is the XLA path's
        loss = lambda **o: lambda *a: jnp.sum(fn(*a, **o) * ct)
        grads = jax.jit(jax.grad(loss(**PALLAS), argnums=(0, 1, 2)))
        for g, r in zip(grads(qs, ks, vs), jax.grad(loss(implementation="xla"), argnums=(0, 1, 2))(q, k, v)):
            assert relerr(g, r) < 1e-5
        compiled.append(grads.lower(qs, ks, vs).compile())
    # Every mask splits its heads (per-head masks: one static branch per head shard); nothing is gathered.
    assert out.sharding.spec == spec
    for program in compiled:
        assert _gathers(program.as_text()) == 0


@pytest.mark.parametrize("spec", [P(None, None, "model"), P("data", None, "model")], ids=str)
def test_decode_per_head_windows_splits_heads(mesh, spec):
    """Decoding with one window per head under head sharding: each device runs the windows of its global heads (sinks
    follow the heads), equal to unsharded, nothing gathered."""
    q, k, v = _arrays()
    lengths, windows, sinks = jnp.array([20, 13, 24, 2]), (3, 7, None, 3, 5, None, None, 9), jnp.linspace(-1, 1, 8)
    decode = lambda q, k, v, **o: pk.decode_attention(q[:, -2:], k, v, lengths, windows, sinks=sinks, **o)
    forward = jax.jit(functools.partial(decode, **PALLAS))
    qs, ks, vs = (jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v))
    out = forward(qs, ks, vs)
    assert relerr(out, decode(q, k, v, implementation="xla")) < 1e-5
    assert out.sharding.spec == spec
    assert _gathers(forward.lower(qs, ks, vs).compile().as_text()) == 0


def test_device_runs_only_its_shard(mesh):
    """The partitioned program's kernel call sees local shapes: 1/8 of the batch x heads work per device."""
    q, k, v = _arrays(seq=32)
    sharding = NamedSharding(mesh, P("data", None, "model"))
    text = jax.jit(functools.partial(pk.flash_attention, **PALLAS)).lower(
        *(jax.device_put(x, sharding) for x in (q, k, v))).compile().as_text()
    assert "f32[2,32,2,16]" in text  # q shard: batch 4/2, heads 8/4
    assert _gathers(text) == 0


@pytest.mark.parametrize("op", list(OPS))
def test_ops_inside_shard_map_with_vma_checks(mesh, op):
    """Each op on the local block inside ``shard_map(check_vma=True)`` equals the op on that block (XLA path)."""
    q, k, v = _arrays()
    spec = P("data", None, "model")
    fn = OPS[op]
    # Masks that differ by head find their global heads from the head axis.
    local_options = {"head_axis_name": "model"} if op in ("multiscale", "sparse") else {}
    local = jax.shard_map(functools.partial(fn, implementation="xla", **local_options), mesh=mesh,
                          in_specs=(spec,) * 3, out_specs=spec)
    out = jax.jit(local)(*(jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v)))
    assert relerr(out, fn(q, k, v, implementation="xla")) < 1e-5


def test_pallas_gpu_kernels_lower_inside_shard_map(mesh):
    """The GPU lowering (Triton) of an op and its gradient inside ``shard_map(check_vma=True)``: the kernels' output
    types carry the varying mesh axes (cross-lowered for CUDA on this CPU machine)."""
    if tuple(int(x) for x in jax.__version__.split(".")[:2]) >= (0, 12):
        pytest.skip("JAX 0.12 cross-lowers Triton kernels only under an abstract GPU mesh, not this 8-device CPU mesh")
    spec = P("data", None, "model")
    q = jax.ShapeDtypeStruct((4, 64, 8, 16), jnp.float32, sharding=NamedSharding(mesh, spec))
    bodies = {
        "window": lambda q: pk.flash_attention(q, q, q, window_size=9, implementation="pallas"),
        # The zero initial state is created inside the op: it must vary like q for the gradient's types to match.
        "linear": lambda q: pk.linear_attention(q, q, q, implementation="pallas")[0],
    }
    for name, body in bodies.items():
        for fn in (body, jax.grad(lambda q: jnp.sum(body(q)))):
            local = jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec)
            assert "triton" in jax.jit(local).trace(q).lower(lowering_platforms=("cuda",)).as_text().lower(), name
