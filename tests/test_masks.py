"""The block-sparse mask rules, checked directly on ``sparse_mask``."""

from __future__ import annotations

import numpy as np
import pytest

import pallas_kernels as pk

CONFIG = dict(block_size=4, num_global_tokens=2, num_local_blocks=3, num_random_blocks=2, seed=7)


def blocks(n, size):
    return np.arange(n) // size


def test_causal_rules_hold_elementwise():
    s, heads, bs = 45, 3, CONFIG["block_size"]
    mask = pk.sparse_mask(s, heads, **CONFIG)
    assert mask.shape == (heads, s, s) and mask.dtype == bool
    i, j = np.arange(s)[:, None], np.arange(s)[None, :]
    bi, bj = i // bs, j // bs
    assert not np.any(mask & (j > i)), "causal mask sees the future"
    local = (bi - bj < CONFIG["num_local_blocks"]) & (j <= i)
    glob = ((j < CONFIG["num_global_tokens"]) | (i < CONFIG["num_global_tokens"])) & (j <= i)
    assert np.all(mask[:, local]) and np.all(mask[:, glob])
    extra = mask & ~(local | glob)  # what the random blocks add
    for h in range(heads):
        for qb in range(-(-s // bs)):
            rows = slice(qb * bs, (qb + 1) * bs)
            seen_blocks = set(bj[0][extra[h, rows].any(0)])
            assert len(seen_blocks) <= CONFIG["num_random_blocks"]
            for kb in seen_blocks:
                assert kb < qb - CONFIG["num_local_blocks"] + 1, "random blocks are earlier, outside the band"
                cols = (bj[0] == kb)
                block = mask[h, rows][:, cols]
                assert block.all(), "a random block is visible whole"


def test_causal_mask_of_a_prefix_is_the_prefix_of_the_mask():
    big = pk.sparse_mask(70, 2, **CONFIG)
    for s in (1, 4, 5, 33):
        assert np.array_equal(big[:, :s, :s], pk.sparse_mask(s, 2, **CONFIG))


def test_random_blocks_depend_on_seed_and_head_deterministically():
    a = pk.sparse_mask(64, 4, **CONFIG)
    assert np.array_equal(a, pk.sparse_mask(64, 4, **CONFIG))
    assert not np.array_equal(a, pk.sparse_mask(64, 4, **{**CONFIG, "seed": 8}))
    assert not all(np.array_equal(a[0], a[h]) for h in range(1, 4))


def test_zero_random_blocks_leave_band_and_globals():
    s, bs = 40, 4
    mask = pk.sparse_mask(s, 2, **{**CONFIG, "num_random_blocks": 0})
    i, j = np.arange(s)[:, None], np.arange(s)[None, :]
    want = (j <= i) & ((i // bs - j // bs < 3) | (j < 2) | (i < 2))
    assert np.array_equal(mask, np.broadcast_to(want, mask.shape))


def test_bidirectional_band_globals_and_random():
    s, bs = 48, 4
    mask = pk.sparse_mask(s, 2, **{**CONFIG, "num_random_blocks": 0}, causal=False)
    i, j = np.arange(s)[:, None], np.arange(s)[None, :]
    want = (np.abs(i // bs - j // bs) <= 1) | (j < 2) | (i < 2)
    assert np.array_equal(mask, np.broadcast_to(want, mask.shape))
    with_random = pk.sparse_mask(s, 2, **CONFIG, causal=False)
    assert np.all(with_random >= mask)
    extra_per_row_block = (with_random & ~mask).reshape(2, s // bs, bs, s).any(2).reshape(2, s // bs, s // bs, bs)
    assert np.all(extra_per_row_block.any(-1).sum(-1) <= 2)


@pytest.mark.parametrize(
    "kwargs,error",
    [
        (dict(block_size=0), ValueError),
        (dict(num_local_blocks=0), ValueError),
        (dict(num_random_blocks=-1), ValueError),
        (dict(num_global_tokens=-2), ValueError),
        (dict(seed=1.5), TypeError),
    ],
)
def test_bad_configuration_is_refused(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        pk.sparse_mask(16, 2, **kwargs)
