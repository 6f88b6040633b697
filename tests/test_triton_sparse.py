"""The block-sparse Triton kernels (interpret mode) and their block tables against the dense ``sparse_mask``."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels._softmax_kernels import sparse_attention
from pallas_kernels._triton.softmax import KernelConfig
from pallas_kernels.block_tables import block_tables, split_long_rows
from tests.conftest import relerr


def config(block_q, block_k, block_q_bwd, block_k_bwd) -> KernelConfig:
    return KernelConfig(block_q, block_k, block_q_bwd, block_k_bwd, 4, 1, 4, 1)


def dense_mask(mask: pk.SparseMask, q_len: int, kv_len: int) -> np.ndarray:
    """bool ``[heads, q_len, kv_len]``: the queries are the last positions."""
    full = pk.sparse_mask(kv_len, mask.num_heads, mask.block_size, mask.num_global_tokens, mask.num_local_blocks,
                          mask.num_random_blocks, mask.seed, mask.causal)
    return full[:, kv_len - q_len:]


def reference_vjp(q, k, v, do, visible, scale):
    """Float64 output and (dq, dk, dv) of masked softmax attention, as numpy arrays."""

    def attend(q, k, v):
        group = q.shape[2] // k.shape[2]
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
        s = jnp.where(visible, jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale, -jnp.inf)
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)

    with jax.enable_x64(True):
        args = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)]
        out, vjp = jax.vjp(attend, *args)
        return np.asarray(out), [np.asarray(g) for g in vjp(jnp.asarray(np.asarray(do, np.float64)))]


# (batch, q_len, kv_len, heads, kv_heads, head_dim, SparseMask arguments after num_heads, kernel blocks)
CASES = {
    "causal_global_crosses_block_gqa2": (1, 50, 50, 2, 1, 16, dict(block_size=16, num_global_tokens=20,
                                         num_local_blocks=2, num_random_blocks=2, seed=1), (16, 16, 16, 16)),
    "causal_q_shorter_mixed_blocks": (1, 21, 70, 2, 2, 16, dict(block_size=32, num_global_tokens=1,
                                      num_local_blocks=2, num_random_blocks=1, seed=2), (32, 16, 16, 32)),
    "causal_small_mask_blocks_no_random": (2, 40, 40, 4, 2, 24, dict(block_size=8, num_global_tokens=0,
                                           num_local_blocks=3, num_random_blocks=0), (16, 16, 16, 16)),
    "bidir_gqa2_blocks32": (1, 45, 45, 2, 1, 16, dict(block_size=16, num_global_tokens=3, num_local_blocks=3,
                            num_random_blocks=2, seed=4, causal=False), (32, 32, 32, 32)),
    "bidir_q_shorter_ragged_mask_blocks": (1, 19, 53, 4, 2, 16, dict(block_size=12, num_global_tokens=25,
                                           num_local_blocks=1, num_random_blocks=1, seed=5, causal=False),
                                           (16, 32, 16, 16)),
    # The global column's key tile is seen by all 38 query tiles: its dK/dV loop runs in 3 pieces (see below).
    "causal_long_global_column_in_pieces": (1, 600, 600, 4, 2, 16, dict(block_size=16, num_global_tokens=1,
                                            num_local_blocks=2, num_random_blocks=1, seed=3), (16, 16, 16, 16)),
}


def test_long_key_rows_are_split_into_pieces_that_cover_them_once():
    mask = pk.SparseMask(4, block_size=16, num_global_tokens=1, num_local_blocks=2, num_random_blocks=1, seed=3)
    table = block_tables(mask, 600, 600, 16, 16).by_key
    pieces = split_long_rows(table)
    lengths = table.bounds[..., 2] - table.bounds[..., 0]
    assert pieces.length == 4 * int(np.ceil(lengths.mean())) and lengths[:, 0].max() > 2 * pieces.length
    assert set(pieces.tiles.tolist()) == {0} and np.all(pieces.parts >= 1)
    # Entries [start + p * length, ...) of every head's row, for piece 0 and the listed parts, tile the row exactly.
    for tile in range(lengths.shape[1]):
        parts = [0] + pieces.parts[pieces.tiles == tile].tolist()
        for h in range(4):
            start, _, end = table.bounds[h, tile]
            covered = np.concatenate([np.arange(start, end)[p * pieces.length:(p + 1) * pieces.length] for p in parts])
            assert np.array_equal(covered, np.arange(start, end))


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_dense_masked_float64_reference(case):
    batch, q_len, kv_len, heads, kv_heads, head_dim, mask_args, blocks = case
    mask = pk.SparseMask(heads, **mask_args)
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim))
    k = jax.random.normal(keys[1], (batch, kv_len, kv_heads, head_dim))
    v = jax.random.normal(keys[2], (batch, kv_len, kv_heads, head_dim))
    do = jax.random.normal(keys[3], q.shape)
    scale = head_dim**-0.5

    attend = lambda q, k, v: sparse_attention(q, k, v, mask=mask, softmax_scale=scale, interpret=True,
                                              config=config(*blocks))
    out, vjp = jax.vjp(attend, q, k, v)
    want_out, want_grads = reference_vjp(q, k, v, do, dense_mask(mask, q_len, kv_len), scale)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *vjp(do)), (want_out, *want_grads)):
        assert got.shape == want.shape and got.dtype == jnp.float32, name
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(want).max()),
                                   err_msg=name)


def test_op_takes_kernel_config_and_refuses_long_queries():
    q = jax.random.normal(jax.random.key(1), (1, 24, 2, 16))
    kwargs = dict(block_size=8, num_random_blocks=1, causal=False)
    got = pk.sparse_attention(q, q, q, **kwargs, implementation="pallas", interpret=True,
                              kernel_config=config(16, 16, 16, 16))
    assert relerr(got, pk.sparse_attention(q, q, q, **kwargs, implementation="xla")) < 1e-5
    with pytest.raises(ValueError, match="q_len"):
        pk.sparse_attention(q, q[:, :20], q[:, :20], **kwargs, implementation="pallas", interpret=True)
    with pytest.raises(ValueError, match="num_heads"):
        sparse_attention(q, q, q, mask=pk.SparseMask(3), softmax_scale=1.0, interpret=True)


TABLE_CASES = [
    # (SparseMask, q_len, kv_len, block_q, block_k)
    (pk.SparseMask(3, 16, 20, 2, 2, seed=1), 50, 50, 16, 16),
    (pk.SparseMask(2, 32, 1, 2, 1, seed=2), 21, 70, 32, 16),
    (pk.SparseMask(2, 8, 0, 3, 0), 40, 40, 16, 32),
    (pk.SparseMask(2, 4, 6, 2, 3, seed=3), 64, 64, 16, 16),
    (pk.SparseMask(3, 16, 3, 3, 2, seed=4, causal=False), 45, 45, 32, 16),
    (pk.SparseMask(2, 12, 25, 1, 1, seed=5, causal=False), 19, 53, 16, 32),
    (pk.SparseMask(2, 64, 1, 3, 3, seed=6, causal=False), 200, 300, 64, 64),
]


@pytest.mark.parametrize("mask,q_len,kv_len,block_q,block_k", TABLE_CASES)
def test_block_tables_are_exact(mask, q_len, kv_len, block_q, block_k):
    """FULL tiles are entirely visible and in bounds, FULL + PARTIAL are exactly the tiles holding a visible
    element, runs are ascending, and the key-major table is the transpose of the query-major one."""
    heads, n_qt, n_kt = mask.num_heads, -(-q_len // block_q), -(-kv_len // block_k)
    visible = np.zeros((heads, n_qt * block_q, n_kt * block_k), bool)
    inside = np.zeros_like(visible)
    visible[:, :q_len, :kv_len] = dense_mask(mask, q_len, kv_len)
    inside[:, :q_len, :kv_len] = True
    tiles = lambda x: x.reshape(heads, n_qt, block_q, n_kt, block_k).transpose(0, 1, 3, 2, 4)
    want_any = tiles(visible).any(axis=(3, 4))
    want_full = tiles(visible & inside).all(axis=(3, 4))

    tables = block_tables(mask, q_len, kv_len, block_q, block_k)
    for table, n_rows, transpose in ((tables.by_query, n_qt, False), (tables.by_key, n_kt, True)):
        assert table.bounds.shape == (heads, n_rows, 3) and table.bounds.dtype == table.blocks.dtype == np.int32
        assert table.bounds[0, 0, 0] == 0 and table.bounds[-1, -1, 2] == table.blocks.size
        assert np.array_equal(table.bounds.reshape(-1, 3)[1:, 0], table.bounds.reshape(-1, 3)[:-1, 2])
        got_any, got_full = np.zeros_like(want_any), np.zeros_like(want_full)
        for h in range(heads):
            for row in range(n_rows):
                start, full_end, end = table.bounds[h, row]
                full, partial = table.blocks[start:full_end], table.blocks[full_end:end]
                assert np.all(np.diff(full) > 0) and np.all(np.diff(partial) > 0)
                index = (h, slice(None), row) if transpose else (h, row)
                got_any[index][np.concatenate([full, partial])] = True
                got_full[index][full] = True
        assert np.array_equal(got_full, want_full)
        assert np.array_equal(got_any, want_any)


def test_block_tables_of_long_sequences_are_fast_and_sparse():
    mask = pk.SparseMask(4, 64, 1, 3, 3, seed=7)
    start = time.perf_counter()
    tables = block_tables(mask, 65536, 65536, 64, 64)
    assert time.perf_counter() - start < 10.0
    # Band (3) + global column (1) + random (3) tiles per query tile, plus one global row: O(tiles), not O(tiles^2).
    assert tables.by_query.blocks.size <= 4 * (1024 * 7 + 1024)
    assert tables.by_key.blocks.size == tables.by_query.blocks.size


@pytest.mark.gpu
def test_real_size_bf16_against_xla_float32():
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (1, 4096, 16, 128), jnp.bfloat16)
    k = jax.random.normal(keys[1], (1, 4096, 4, 128), jnp.bfloat16)
    v = jax.random.normal(keys[2], (1, 4096, 4, 128), jnp.bfloat16)
    ct = jax.random.normal(keys[3], q.shape, jnp.float32)
    f32 = lambda *xs: tuple(x.astype(jnp.float32) for x in xs)
    attend = lambda *a, **o: pk.sparse_attention(*a, block_size=64, **o)
    loss = lambda *a, **o: jnp.sum(attend(*a, **o).astype(jnp.float32) * ct)

    out = jax.jit(lambda *a: attend(*a, implementation="pallas"))(q, k, v)
    assert out.dtype == jnp.bfloat16
    assert relerr(out, attend(*f32(q, k, v), implementation="xla")) < 1e-2
    got = jax.jit(jax.grad(lambda *a: loss(*a, implementation="pallas"), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(lambda *a: loss(*a, implementation="xla"), argnums=(0, 1, 2))(*f32(q, k, v))
    for g, w in zip(got, want):
        assert relerr(g, w) < 2e-2
