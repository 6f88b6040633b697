"""Shared test settings: float64 references, the ``gpu`` marker and the implementation parametrisation."""

from __future__ import annotations

import os

# Eight host devices for the sharding tests; set before JAX initialises its backends.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

ON_GPU = jax.default_backend() == "gpu"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not ON_GPU:
            item.add_marker(skip_gpu)


# The two backends every op is tested on: the XLA path, and the Pallas kernels in interpret mode
# (on a GPU the real kernels are exercised by the tests marked ``gpu``).
IMPLEMENTATIONS = {
    "xla": {"implementation": "xla"},
    "pallas": {"implementation": "pallas", "interpret": True},
}


@pytest.fixture(params=list(IMPLEMENTATIONS))
def impl(request) -> dict:
    return IMPLEMENTATIONS[request.param]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def gpu_target(device_kind: str = "NVIDIA H200"):
    """A context for lowering GPU kernels on a host without a GPU (``lower(lowering_platforms=("cuda",))``).

    JAX 0.12's Triton lowering reads the target GPU's kind from the abstract mesh (its launch settings depend on
    it) and raises without one; JAX 0.10 and 0.11 accept it and lower as before.
    """
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=None, platform="gpu")
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device))


def x64():
    """A context in which JAX computes in float64."""
    return jax.enable_x64(True)


def relerr(got, want) -> float:
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert np.all(np.isfinite(got)), "non-finite values in the result"
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def scan_decode(attn, params, cache, tokens):
    """Feeds ``tokens [b, t, hidden]`` one at a time through ``attn`` in a jitted ``lax.scan``.

    Returns the final cache and the outputs ``[b, t, hidden]``.
    """

    @jax.jit
    def decode(cache, tokens):
        def step(cache, token):
            out, cache = attn.apply(params, token[:, None], cache=cache)
            return cache, out[:, 0]

        return jax.lax.scan(step, cache, jnp.swapaxes(tokens, 0, 1))

    cache, outs = decode(cache, tokens)
    return cache, jnp.swapaxes(outs, 0, 1)
