"""The benchmark's FLOP counts against brute force, and its harness end to end on tiny shapes."""

import json
import pathlib
import subprocess

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


@pytest.mark.slow
def test_quick_run_of_every_suite(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    results = data["results"]
    ours = [r for r in results if r["impl"].startswith(("ours", "pallas_triton"))]
    assert {r["suite"] for r in ours} == set(bench.SUITES)
    for r in ours:
        assert r["forward_ms"] is not None and r["forward_ms"] > 0, r
        if r["suite"] == "decode":
            assert r["bandwidth_gb_s"] > 0, r
        else:
            assert r["forward_backward_ms"] > 0 and r["temp_memory_bytes"] > 0, r
    assert data["meta"]["copy_bandwidth_gb_s"] > 0
    table = capsys.readouterr().out
    assert f"raw results written to {out.resolve()}" in table
    # Labels come from the configuration that ran: --quick has 4 heads, a window of 32 and 64-token blocks.
    assert "multiscale 2 local (8/16) + 2 global" in table and "window 32" in table
    assert "bigbird block 64, 1 global, 3 local, 3 random" in table and "batch 2" in table
    assert "packed docs of 64-128 (3 docs)" in table and "flash causal, soft-cap 30 + sinks" in table
    # Aligned: every row's S column ends where the header's does.
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("suite"))
    s_end = header.index(" S ") + 2
    rows = [line for line in lines if line.split(" ", 1)[0] in bench.SUITES]
    assert len(rows) == len(results)
    assert all(row[s_end - 1].isdigit() and row[s_end] == " " for row in rows)


def test_default_json_goes_to_the_ignored_folder(monkeypatch, tmp_path):
    path = bench.default_json_path("NVIDIA H200")
    assert path.parent == pathlib.Path("bench_out") and path.name.startswith("bench_nvidia_h200_")
    root = pathlib.Path(__file__).resolve().parents[1]
    ignored = subprocess.run(["git", "check-ignore", "-q", str(root / path)], cwd=root)
    assert ignored.returncode == 0, f"{path} is not git-ignored"


def test_help_states_every_default(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: all of them)", "(default: 1024, or 32 with --quick)", "(default: 20, or 2 with --quick)",
                    "default: a new file in bench_out/", "softmax 8192 32768"):
        assert default in text, default


def test_multiscale_windows_split_the_local_heads_evenly():
    assert bench.multiscale_windows(1024, 16) == (256,) * 6 + (512,) * 5 + (1024,) * 5
    assert bench.multiscale_windows(32, 2) == (8, 16)
