"""Prefill + compiled decode through a stack of all five forms equals the full-sequence forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from complexity_jax import CUDA, CacheFullError
from complexity_jax.generate import AttentionStack, generate
from tests.conftest import relerr


def stack():
    common = dict(hidden_size=32, num_heads=4, num_kv_heads=2)
    return AttentionStack((
        CUDA.flash(**common),
        CUDA.sliding_window(window_size=3, **common),
        CUDA.sparse(block_size=2, num_random_blocks=1, **common),
        CUDA.linear(**common),
        CUDA.multiscale(window_sizes=(2, 4), **common),
    ))


def test_generation_matches_the_full_sequence_token_by_token():
    model = stack()
    prompt = jax.random.normal(jax.random.key(0), (2, 7, 32)) * 0.5
    params = model.init(jax.random.key(1), prompt)
    prefill, decoded, caches = generate(model, params, prompt, num_steps=6)
    assert decoded.shape == (2, 6, 32)
    # Each decoded step consumed the previous output; replay those inputs in one pass.
    inputs = jnp.concatenate([prompt, prefill[:, -1:], decoded[:, :-1]], axis=1)
    full, _ = model.apply(params, inputs)
    assert relerr(prefill, full[:, :7]) < 1e-5
    for t in range(6):
        assert relerr(decoded[:, t], full[:, 7 + t]) < 1e-4, f"step {t}"
    assert caches[0].length.tolist() == [13, 13] and caches[1].keys.shape[1] == 3


def test_too_small_a_cache_is_reported():
    model = stack()
    prompt = jnp.ones((1, 4, 32))
    params = model.init(jax.random.key(1), prompt)
    with pytest.raises(CacheFullError):
        generate(model, params, prompt, num_steps=5, max_length=6)
