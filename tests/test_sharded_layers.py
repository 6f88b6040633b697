"""Data + tensor parallel layers on a 2 x 4 mesh of host devices: a training step and a cached decode step sharded
over batch ("data") and heads ("model") equal the unsharded ones."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from complexity_jax import CUDA
from complexity_jax.sharding import cache_shardings, logical_specs, param_shardings
from tests.conftest import relerr


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))


LAYERS = {
    "flash": lambda **o: CUDA.flash(hidden_size=128, num_heads=8, num_kv_heads=4, **o),
    "sliding_window": lambda **o: CUDA.sliding_window(hidden_size=128, num_heads=8, num_kv_heads=4, window_size=6, **o),
    "multiscale": lambda **o: CUDA.multiscale(hidden_size=128, num_heads=8, num_kv_heads=4, local_heads=4,
                                              window_sizes=(3, 6), **o),
    "linear": lambda **o: CUDA.linear(hidden_size=128, num_heads=8, num_kv_heads=4, **o),
    "sparse": lambda **o: CUDA.sparse(hidden_size=128, num_heads=8, num_kv_heads=4, block_size=8, **o),
}


@pytest.mark.parametrize("boxed", [False, True])
def test_parameters_have_logical_axes(mesh, boxed):
    layer = LAYERS["flash"](implementation="xla", logical_partitioning=boxed)
    params = layer.init(jax.random.key(0), jnp.zeros((2, 8, 128)))
    kernel = params["params"]["q_proj"]["kernel"]
    assert isinstance(kernel, nn.LogicallyPartitioned) == boxed
    specs = nn.get_partition_spec(params)["params"] if boxed else logical_specs(params)["params"]
    assert specs["q_proj"]["kernel"] == P("embed", "heads")
    assert specs["k_proj"]["kernel"] == P("embed", "kv_heads")
    assert specs["o_proj"]["kernel"] == P("heads", "embed")
    assert param_shardings(params, mesh)["params"]["q_proj"]["kernel"].spec == P(None, "model")


@pytest.mark.parametrize("form", list(LAYERS))
def test_data_and_tensor_parallel_training_step_equals_unsharded(mesh, form):
    layer = LAYERS[form](implementation="xla")
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 16, 128)), jnp.float32)
    params = layer.init(jax.random.key(0), x)
    loss = lambda p, x: jnp.mean(layer.apply(p, x)[0] ** 2)
    want_loss, want_grads = jax.value_and_grad(loss)(nn.unbox(params), x)

    shardings = param_shardings(params, mesh)
    sharded_params = jax.device_put(nn.unbox(params), shardings)
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    got_loss, got_grads = jax.jit(jax.value_and_grad(loss))(sharded_params, xs)
    assert abs(float(got_loss) - float(want_loss)) < 1e-5 * abs(float(want_loss))
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        assert relerr(g, w) < 1e-5
    q_grad = got_grads["params"]["q_proj"]["kernel"]
    assert q_grad.sharding.spec == P(None, "model")  # gradients stay sharded like their parameters


@pytest.mark.parametrize("form", ["flash", "sliding_window", "linear"])
def test_sharded_cache_continues_like_unsharded(mesh, form):
    layer = LAYERS[form](implementation="pallas", interpret=True)
    rng = np.random.default_rng(1)
    prompt, token = (jnp.asarray(rng.standard_normal((4, n, 128)), jnp.float32) for n in (12, 1))
    params = nn.unbox(layer.init(jax.random.key(0), prompt))
    _, cache = layer.apply(params, prompt)
    want, _ = layer.apply(params, token, cache=cache)

    cache = layer.init_cache(batch_size=4, max_length=16)
    cache = jax.device_put(cache, cache_shardings(cache, mesh))
    step = jax.jit(lambda p, x, c: layer.apply(p, x, cache=c))
    data = NamedSharding(mesh, P("data"))
    _, cache = step(params, jax.device_put(prompt, data), cache)
    got, cache = step(params, jax.device_put(token, data), cache)
    assert relerr(got, want) < 1e-5
    leaf = jax.tree.leaves(cache)[0]
    assert leaf.sharding.spec[0] == "data"
