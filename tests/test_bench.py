"""The benchmark's FLOP counts against brute force, and its harness end to end on tiny shapes."""

import json

import numpy as np
import pytest

import pallas_kernels as pk
from complexity_jax import bench


@pytest.mark.parametrize("windows", [(None,), (5,), (1, None, 64)])
def test_visible_pairs_counts_the_causal_window_band(windows):
    s = 37
    i, j = np.arange(s)[:, None], np.arange(s)[None, :]
    expected = sum(int(((i >= j) & (i - j < (s if w is None else w))).sum()) for w in windows)
    assert bench.visible_pairs(s, windows) == expected


@pytest.mark.parametrize(
    "seq_len, block_size, n_global, n_local, n_random",
    [(300, 16, 1, 3, 3), (257, 32, 40, 2, 1), (200, 8, 0, 1, 0), (130, 64, 1, 3, 3)],
)
def test_sparse_visible_pairs_equals_the_mask(seq_len, block_size, n_global, n_local, n_random):
    mask = pk.SparseMask(3, block_size, n_global, n_local, n_random, seed=5)
    dense = pk.sparse_mask(seq_len, 3, block_size, n_global, n_local, n_random, seed=5)
    assert bench.sparse_visible_pairs(mask, seq_len) == int(dense.sum())


def test_quick_run_of_every_suite(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    ours = [r for r in results if r["impl"] == "ours"]
    assert {r["suite"] for r in ours} == {"softmax", "multiscale", "sparse", "linear", "decode"}
    for r in ours:
        assert r["forward_ms"] is not None and r["forward_ms"] > 0, r
        if r["suite"] == "decode":
            assert r["bandwidth_gb_s"] > 0, r
        else:
            assert r["forward_backward_ms"] > 0 and r["temp_memory_bytes"] > 0, r
    table = capsys.readouterr().out
    assert "copy bandwidth" in table and "bigbird" in table
