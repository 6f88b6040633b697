"""The backend seam and the selection rules (CPU): which path runs each call, and what a forced backend says."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import _softmax_kernels
from pallas_kernels._dispatch import choose_backend
from pallas_kernels._mosaic import softmax as mosaic
from pallas_kernels.masks import Segments, SparseMask, WindowMask
from tests.conftest import gpu_target, relerr

BOTH = {"mosaic": None, "triton": None}
TRITON_ONLY = {"mosaic": "no Hopper GPU", "triton": None}


@pytest.mark.parametrize(
    "implementation,kernels,on_gpu,expected",
    [
        ("xla", BOTH, True, "xla"),
        ("auto", BOTH, True, "mosaic"),
        ("auto", TRITON_ONLY, True, "triton"),
        ("auto", BOTH, False, "xla"),
        ("auto", {"mosaic": "x", "triton": "y"}, True, "xla"),
        ("pallas", BOTH, False, "mosaic"),
        ("pallas", TRITON_ONLY, True, "triton"),
        ("pallas_triton", BOTH, True, "triton"),
        ("pallas_mosaic", BOTH, False, "mosaic"),
    ],
)
def test_choose_backend(monkeypatch, implementation, kernels, on_gpu, expected):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu" if on_gpu else "cpu")
    assert choose_backend(implementation, "op", kernels) == expected


def test_forced_backend_that_cannot_serve_raises_with_the_reason():
    with pytest.raises(NotImplementedError, match="pallas_mosaic.*no Hopper GPU"):
        choose_backend("pallas_mosaic", "flash_attention", TRITON_ONLY)
    with pytest.raises(NotImplementedError, match="mosaic: x; triton: y"):
        choose_backend("pallas", "flash_attention", {"mosaic": "x", "triton": "y"})
    with pytest.raises(NotImplementedError, match="no mosaic kernel"):
        choose_backend("pallas_mosaic", "linear_attention", {"triton": None})
    with pytest.raises(ValueError, match="implementation must be one of"):
        choose_backend("cuda", "op", BOTH)


def test_pallas_mosaic_on_this_machine_names_what_is_missing():
    q = jnp.zeros((1, 64, 2, 64), jnp.bfloat16)
    with pytest.raises(NotImplementedError, match="compute capability >= 9.0|interpret"):
        pk.flash_attention(q, q, q, implementation="pallas_mosaic")
    with pytest.raises(NotImplementedError, match="no mosaic kernel"):
        pk.linear_attention(q, q, q, implementation="pallas_mosaic")


@pytest.mark.parametrize(
    "dtype,head_dim,mask,backward,match",
    [
        (jnp.float32, 64, WindowMask((None,) * 2), False, "bfloat16 or float16"),
        (jnp.bfloat16, 96, WindowMask((None,) * 2), False, "head_dim"),
        (jnp.bfloat16, 256, WindowMask((None,) * 2), True, "backward takes head_dim <= 128"),
        (jnp.bfloat16, 64, SparseMask(2), False, "not block-sparse"),
        (jnp.bfloat16, 64, WindowMask((None,) * 2), False, "compute capability"),
    ],
)
def test_mosaic_unsupported_reasons(dtype, head_dim, mask, backward, match):
    q = jnp.zeros((1, 64, 2, head_dim), dtype)
    assert mosaic.unsupported_reason(q, q, mask, backward=backward) is not None
    assert match in mosaic.unsupported_reason(q, q, mask, backward=backward)


def test_kernel_config_type_is_checked_and_picks_its_backend():
    q = jnp.zeros((1, 32, 2, 16), jnp.float32)
    with pytest.raises(TypeError, match="kernel_config must be a KernelConfig"):
        pk.flash_attention(q, q, q, implementation="pallas", interpret=True, kernel_config={"block_q": 16})
    with pytest.raises(NotImplementedError, match="pallas_triton.*MosaicConfig"):
        pk.flash_attention(q, q, q, implementation="pallas_triton", interpret=True,
                           kernel_config=pk.MosaicConfig())
    with pytest.raises(ValueError, match="multiple of 64"):
        pk.MosaicConfig(block_q=32)


@pytest.mark.parametrize("windows, head_dim, block_kv_dq, block_kv", [
    ((None, None), 128, 128, 128),
    ((1024, None), 64, 128, 128),  # multi-scale with global heads: the global heads dominate, as in full attention
    ((1024, 256), 128, 64, 128),
    ((512,), 256, 64, 64),
])
def test_mosaic_default_config_follows_windows_and_head_dim(windows, head_dim, block_kv_dq, block_kv):
    config = mosaic.default_config(head_dim, windows)
    assert (config.block_kv_dq, config.block_kv) == (block_kv_dq, block_kv)


def test_mosaic_default_config_is_filled_from_the_mask():
    q = jnp.zeros((1, 64, 2, 64), jnp.bfloat16)
    plan = _softmax_kernels.Plan(WindowMask((32, 32), causal=True), 1.0, "mosaic", "mosaic")
    assert _softmax_kernels.prepare(q, q, q, plan)[1].mosaic_config.block_kv_dq == 64


@pytest.mark.parametrize("scale", [-0.3, 0.0, 0.25])
def test_any_finite_softmax_scale_matches_xla(scale):
    """The kernels see a positive scale (q's sign flipped, or q zeroed): same function and gradients."""
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 37, 2, 16)), jnp.float32) for _ in range(3))
    run = lambda impl: lambda q, k, v: pk.flash_attention(q, k, v, window_size=9, softmax_scale=scale, **impl)
    pallas, xla = run({"implementation": "pallas_triton", "interpret": True}), run({"implementation": "xla"})
    assert relerr(pallas(q, k, v), xla(q, k, v)) < 1e-5
    loss = lambda f: lambda *a: jnp.sum(f(*a) ** 2)
    for g, r in zip(jax.grad(loss(pallas), argnums=(0, 1, 2))(q, k, v), jax.grad(loss(xla), argnums=(0, 1, 2))(q, k, v)):
        assert np.allclose(g, r, atol=1e-5)


def test_plan_rejects_unknown_backends():
    with pytest.raises(ValueError, match="forward_backend must be one of"):
        _softmax_kernels.Plan(WindowMask((None,)), 1.0, forward_backend="cuda")


@pytest.mark.parametrize("segmented", [False, True])
def test_mosaic_kernels_lower_for_a_hopper_gpu(segmented):
    """Cross-lowering to Mosaic GPU runs on a CPU machine where this JAX supports it: the kernels trace and lower,
    with and without segment ids."""
    if jax.__version__ not in mosaic.SUPPORTED_JAX:
        pytest.skip(f"Mosaic kernels are written against JAX {mosaic.SUPPORTED_JAX}, this is {jax.__version__}")
    q = jax.ShapeDtypeStruct((1, 200, 4, 64), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 300, 2, 64), jnp.bfloat16)
    lse = jax.ShapeDtypeStruct((1, 4, 200), jnp.float32)
    segments = Segments(jax.ShapeDtypeStruct((1, 200), jnp.int32), jax.ShapeDtypeStruct((1, 300), jnp.int32))
    segments = segments if segmented else None
    mask, config = WindowMask((16, 100, None, None), causal=True), mosaic.MosaicConfig()
    fwd = jax.jit(lambda q, k, v, s: mosaic.forward(q, k, v, mask, 0.125, config, s))
    bwd = jax.jit(lambda q, k, v, o, lse, do, s: mosaic.backward(mask, 0.125, config, (q, k, v, o, lse), do, s))
    with gpu_target():
        lowered = (fwd.trace(q, k, k, segments).lower(lowering_platforms=("cuda",)),
                   bwd.trace(q, k, k, q, lse, q, segments).lower(lowering_platforms=("cuda",)))
    for lowered, launches in zip(lowered, (1, 2)):  # the backward: the dQ kernel, then the dK/dV kernel
        assert len(re.findall(r"custom_call @mosaic_gpu", lowered.as_text())) == launches
