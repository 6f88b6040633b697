"""The Triton decode kernel (split-K flash-decoding) in interpret mode against a float64 numpy reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels._triton.decode import (_MIN_BLOCKS_PER_SPLIT, DecodeConfig, _chunk, _deal, _Static,
                                           _window_blocks, decode_attention, default_config)
from tests.conftest import gpu_target, relerr


def reference(q, k, v, lengths, windows, scale) -> np.ndarray:
    """Float64 decode attention straight from the definition; rows that see no slot output zeros."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, t, heads, _ = q.shape
    group = heads // k.shape[2]
    out = np.zeros(q.shape)
    for b, length in enumerate(np.asarray(lengths)):
        pos = length - t + np.arange(t)
        dist = pos[:, None] - np.arange(k.shape[1])[None, :]
        for h in range(heads):
            w = np.inf if windows[h] is None else windows[h]
            seen = (dist >= 0) & (dist < w)
            s = np.where(seen, q[b, :, h] @ k[b, :, h // group].T * scale, -np.inf)
            m = s.max(axis=1, keepdims=True)
            p = np.exp(s - np.where(np.isfinite(m), m, 0.0))
            total = p.sum(axis=1, keepdims=True)
            out[b, :, h] = p @ v[b, :, h // group] / np.where(total == 0, 1.0, total)
    return out


def inputs(seed, batch, t, capacity, heads, kv_heads, head_dim, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    make = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
    kv_shape = (batch, capacity, kv_heads, head_dim)
    return make(batch, t, heads, head_dim), make(*kv_shape), make(*kv_shape)


def run(q, k, v, lengths, windows, num_splits=2, block_k=16, scale=0.3):
    config = DecodeConfig(block_k=block_k, num_splits=num_splits)
    return decode_attention(q, k, v, jnp.asarray(lengths), windows=windows, softmax_scale=scale, interpret=True,
                            config=config)


# (batch, t, capacity, heads, kv_heads, head_dim, lengths, windows, num_splits); blocks of 16 slots.
CASES = {
    # Lengths 1, a block, a block + 1, full, side by side; t = 3 puts some queries before slot 0 (zero rows).
    "t1_mha_lengths": (4, 1, 64, 2, 2, 16, [1, 16, 17, 64], (None, None), 3),
    "t3_gqa2_lengths_ragged_capacity": (4, 3, 70, 4, 2, 16, [1, 16, 17, 70], (None,) * 4, 2),
    "t1_gqa4_single_split": (2, 1, 40, 4, 1, 16, [40, 23], (None,) * 4, 1),
    "t3_gqa4_small_window": (3, 3, 70, 4, 1, 16, [5, 40, 70], (5,) * 4, 4),
    "t1_gqa4_window_crosses_splits": (2, 1, 96, 4, 1, 16, [96, 50], (20,) * 4, 3),
    "t3_gqa2_per_head_windows": (3, 3, 70, 4, 2, 16, [3, 33, 70], (None, 3, 17, 40), 3),
    # More splits than visible blocks, and a head_dim that is padded to 32.
    "t1_gqa4_per_head_windows_padded_dim": (2, 1, 45, 4, 1, 24, [45, 20], (1, 16, None, 23), 5),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_float64_reference(case):
    batch, t, capacity, heads, kv_heads, head_dim, lengths, windows, splits = case
    q, k, v = inputs(0, batch, t, capacity, heads, kv_heads, head_dim)
    out = run(q, k, v, lengths, windows, splits)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(np.asarray(out), reference(q, k, v, lengths, windows, 0.3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision(dtype):
    q, k, v = inputs(1, 2, 3, 50, 4, 2, 32, dtype)
    lengths, windows = [50, 18], (None, 12, 20, 3)
    out = run(q, k, v, lengths, windows, num_splits=2)
    assert out.dtype == dtype
    assert relerr(out, reference(q, k, v, lengths, windows, 0.3)) < 1e-2


def test_default_config_and_mixed_dtypes():
    """A float32 query against a bfloat16 cache computes in float32, as the XLA path does."""
    q, k, v = inputs(2, 2, 3, 40, 4, 2, 32)
    k, v = k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
    lengths, windows = jnp.array([40, 9]), (None, 7, 7, None)
    out = decode_attention(q, k, v, lengths, windows=windows, softmax_scale=0.3, interpret=True)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), reference(q, k, v, lengths, windows, 0.3), rtol=1e-5, atol=1e-5)


def test_garbage_in_unfilled_slots_is_never_read():
    q, k, v = inputs(3, 2, 1, 48, 2, 1, 16)
    lengths = [20, 33]
    k_nan, v_nan = (x.at[0, 20:].set(jnp.nan).at[1, 33:].set(jnp.inf) for x in (k, v))
    out = run(q, k_nan, v_nan, lengths, (None, 9), num_splits=2)
    np.testing.assert_allclose(np.asarray(out), reference(q, k, v, lengths, (None, 9), 0.3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("capacity", [64, 1000])
def test_splits_cover_exactly_the_visible_blocks(capacity):
    """The splits' key-block ranges partition the blocks holding a visible slot, so a window of W costs O(W)
    blocks whatever the capacity, and splits beyond ``lengths[b]`` or before the window get none."""
    block, t = 16, 3
    for splits in (1, 3, 7):
        for window in (1, 5, 16, 23, 2**30):
            st = _Static(q_len=t, capacity=capacity, head_dim=16, block_k=block, num_splits=splits, softmax_scale=1.0)
            for length in (1, 2, 16, 17, 40, capacity):
                pos = length - t + np.arange(t)
                dist = pos[:, None] - np.arange(capacity)[None, :]
                seen = ((dist >= 0) & (dist < window)).any(axis=0)
                want = sorted({j // block for j in np.flatnonzero(seen)})
                first, last = _window_blocks(jnp.int32(length), jnp.int32(window), st)
                chunk = _chunk((last - first)[None], st)  # a batch of one row: equal splits
                ranges = [tuple(int(x) for x in _deal(first, last, jnp.int32(s), chunk)) for s in range(splits)]
                got = [kb for start, end in ranges for kb in range(start, end)]
                assert got == want, (capacity, splits, window, length, ranges)
                per_split = -(-len(want) // splits)
                assert all(end - start <= per_split for start, end in ranges)


def deal_all(first: np.ndarray, last: np.ndarray, st: _Static) -> tuple[int, np.ndarray, np.ndarray]:
    """The chunk and the ``[grid_splits, rows]`` ranges of every program of one KV head (``first``/``last`` padded
    with empty rows past ``st.batch``, as the kernel's padded lengths are)."""
    first, last = jnp.asarray(first, jnp.int32), jnp.asarray(last, jnp.int32)
    chunk = _chunk(last - first, st)
    start, end = _deal(first[None], last[None], jnp.arange(st.grid_splits, dtype=jnp.int32)[:, None], chunk)
    return int(chunk), np.asarray(start), np.asarray(end)


def test_dealing_covers_each_block_once_and_balances_rows():
    """Property of the dealing over drawn batches: per row the splits' ranges tile ``[first, last)`` in order, each at
    most one chunk long, within the grid; the active programs stay near ``num_splits * batch``; the chunk keeps to the
    minimum-blocks guidance where equal splits did; equal rows get the old equal splits, splits past them empty."""
    rng = np.random.default_rng(0)
    shapes = [(batch, splits) for batch in (1, 2, 3, 6) for splits in (1, 2, 3, 7)]
    for case, (batch, splits) in enumerate(shapes * 4):
        max_entries = int(rng.integers(0, 60))
        st = _Static(q_len=1, capacity=4096, head_dim=16, block_k=16, num_splits=splits, softmax_scale=1.0,
                     batch=batch, max_entries=max_entries)
        assert splits <= st.grid_splits <= min(batch, 2) * splits
        uniform = case % 3 == 0
        n = np.full(batch, rng.integers(0, 60)) if uniform else rng.integers(0, 60, batch)
        n[rng.integers(0, batch)] = max_entries if case % 2 else n.max()  # often a row of the bound's length
        first = rng.integers(0, 20, batch)
        pad = 8 - batch  # padding rows (empty ranges); one width keeps eager jnp from compiling per batch size
        first_p, last_p = np.pad(first, (0, pad)), np.pad(first + n, (0, pad))
        chunk, start, end = deal_all(first_p, last_p, st)
        where = (case, batch, splits, max_entries, n.tolist(), chunk)
        for b in range(batch):
            got = [kb for s in range(st.grid_splits) for kb in range(start[s, b], end[s, b])]
            assert got == list(range(first[b], first[b] + n[b])), where
        assert np.all(end - start <= chunk) and np.all(end >= start), where
        assert np.all(end[:, batch:] == start[:, batch:]), where
        active = int(np.sum(end > start))
        assert active <= splits * batch + batch, where
        longest = int(n.max())
        assert chunk >= min(_MIN_BLOCKS_PER_SPLIT, -(-longest // splits)), where
        if uniform and n.min() == n.max():
            per = -(-longest // splits)
            old_start = np.minimum(first[None] + np.arange(splits)[:, None] * per, first + n)
            np.testing.assert_array_equal(start[:splits, :batch], old_start, err_msg=str(where))
            np.testing.assert_array_equal(end[:splits, :batch], np.minimum(old_start + per, first + n))
            assert np.all(start[splits:] == end[splits:]), where


def test_dealing_of_a_skewed_batch():
    """Rows of 32..256 blocks spread evenly (8 rows at the default 9 splits): the longest row gets 16 splits of 16
    blocks rather than 9 of 29, 72 programs in all; one long row among short ones is capped by the grid (2x)."""
    st = _Static(q_len=1, capacity=32768, head_dim=128, block_k=128, num_splits=9, softmax_scale=1.0, batch=8,
                 max_entries=256)
    assert st.grid_splits == 18
    n = 32 * np.arange(1, 9)
    chunk, start, end = deal_all(np.zeros(8), n, st)
    assert chunk == 16 and np.sum(end > start) == 72 and np.sum(end[:, -1] > start[:, -1]) == 16
    n = np.array([256] + [1] * 7)
    chunk, start, end = deal_all(np.zeros(8), n, st)
    assert chunk == 15 and np.sum(end[:, 0] > start[:, 0]) == 18


@pytest.mark.parametrize("windows", [(None,) * 6, (None, 40, None, 5, 9, 3)], ids=["full", "per_head_windows"])
def test_ragged_batch_equals_xla(windows):
    """Very different row lengths (1, full capacity and between; GQA 3, head_dim 17, two queries so the row of
    length 1 has a query that sees nothing, sinks): balanced splits, some past ``num_splits``, equal the XLA path."""
    batch, t, capacity, heads, kv_heads, head_dim = 5, 2, 320, 6, 2, 17
    q, k, v = inputs(7, batch, t, capacity, heads, kv_heads, head_dim)
    lengths, sinks = jnp.array([1, 320, 57, 2, 200]), jnp.linspace(-1.0, 1.5, heads)
    out = decode_attention(q, k, v, lengths, windows=windows, softmax_scale=0.3, interpret=True, sinks=sinks,
                           config=DecodeConfig(block_k=16, num_splits=2))
    want = pk.decode_attention(q, k, v, lengths, windows, softmax_scale=0.3, sinks=sinks, implementation="xla")
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)
    without_sinks = run(q, k, v, lengths, windows, num_splits=2)
    np.testing.assert_allclose(np.asarray(without_sinks), reference(q, k, v, lengths, windows, 0.3), rtol=1e-5,
                               atol=1e-5)


def test_default_config_heuristic():
    real = default_config(8, 8, 32768, 32768, 16, 128, jnp.bfloat16)
    assert real == DecodeConfig(block_k=128, num_splits=9, num_warps=4, num_stages=2)
    # A window bounds the work, hence the useful splits: 1024 slots are 8 blocks, at least 4 blocks per split.
    assert default_config(1, 1, 32768, 1024 + 3, 16, 128, jnp.bfloat16).num_splits == 3
    assert default_config(64, 64, 32768, 32768, 16, 128, jnp.bfloat16).num_splits == 1
    assert default_config(1, 8, 64, 64, 16, 256, jnp.float32) == DecodeConfig(32, 1, 4, 2)
    assert default_config(1, 8, 64, 64, 16, 64, jnp.float32, DecodeConfig(num_splits=7)).num_splits == 7
    with pytest.raises(ValueError, match="block_k"):
        DecodeConfig(block_k=24)


def test_public_op_under_jit_and_grad():
    q, k, v = inputs(4, 2, 1, 40, 4, 2, 16)
    lengths = jnp.array([40, 7])
    options = dict(implementation="pallas", interpret=True, kernel_config=DecodeConfig(block_k=16, num_splits=2))
    out = jax.jit(lambda *a: pk.decode_attention(*a, window_size=(None, 9, 4, None), **options))(q, k, v, lengths)
    assert relerr(out, reference(q, k, v, lengths, (None, 9, 4, None), 16**-0.5)) < 1e-5

    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) ** 2)
    with pytest.raises(NotImplementedError, match="no Pallas backward"):
        jax.grad(loss(lambda *a: pk.decode_attention(*a, lengths, 9, **options)))(q, k, v)
    # The kernel's own switch: differentiate through the XLA path.
    kernel = lambda *a: decode_attention(*a, lengths, windows=(9,) * 4, softmax_scale=0.25, interpret=True,
                                         config=DecodeConfig(block_k=16, num_splits=2), xla_backward=True)
    xla = lambda *a: pk.decode_attention(*a, lengths, 9, softmax_scale=0.25, implementation="xla")
    got = jax.grad(loss(kernel), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(xla), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        assert relerr(g, w) < 1e-5


@pytest.mark.parametrize("t,heads,head_dim,dtype", [(1, 32, 128, jnp.bfloat16), (3, 16, 96, jnp.float32)])
def test_lowers_to_triton(t, heads, head_dim, dtype):
    """The Pallas -> Triton lowering (power-of-two shapes, supported primitives) runs on any host; the Triton
    compiler itself only runs on a GPU (see the ``gpu`` test)."""
    q = jax.ShapeDtypeStruct((8, t, heads, head_dim), dtype)
    kv = jax.ShapeDtypeStruct((8, 32768, 8, head_dim), dtype)
    windows = (None, 1024) * (heads // 2)
    fn = lambda q, k, v, lengths: decode_attention(q, k, v, lengths, windows=windows, softmax_scale=0.1)
    with gpu_target():
        lowered = jax.jit(fn).trace(q, kv, kv, jax.ShapeDtypeStruct((8,), jnp.int32)).lower(
            lowering_platforms=("cuda",))
    assert "__gpu$xla.gpu.triton" in lowered.as_text()


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, (1000, 4096, 300, 64)])
def test_real_size_bfloat16_against_xla_float32(window):
    batch, capacity, heads, kv_heads, head_dim = 8, 32768, 32, 8, 128
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (batch, 1, heads, head_dim), jnp.bfloat16)
    k = jax.random.normal(keys[1], (batch, capacity, kv_heads, head_dim), jnp.bfloat16)
    v = jax.random.normal(keys[2], (batch, capacity, kv_heads, head_dim), jnp.bfloat16)
    lengths = jnp.array([capacity, 1, 129, 5000, 16384, 32767, 300, 20000])
    window = window if window is None else window * (heads // 4)
    out = jax.jit(lambda *a: pk.decode_attention(*a, window, implementation="pallas"))(q, k, v, lengths)
    f32 = lambda x: x.astype(jnp.float32)
    want = pk.decode_attention(f32(q), f32(k), f32(v), lengths, window, implementation="xla")
    assert out.dtype == jnp.bfloat16
    assert relerr(out, want) < 1e-2
