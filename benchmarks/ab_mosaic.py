"""Mosaic GPU softmax kernels on the H200: each ``MosaicConfig`` variant's gradients checked against the float32 XLA
path on the GPU tests' cases, an interleaved A/B of the variants at d128 and d64 beside cuDNN, the d64 and d256
rows beside cuDNN, and a profile: each GPU kernel's time inside one forward+backward, ours beside cuDNN's (issue 13).
Batch 2, 32 query / 8 KV heads, S=8192, bf16; forward and forward+backward ms.

    PYTHONPATH=. python benchmarks/ab_mosaic.py OUT.json [--part check ab head_dims profile window]

Each measurement is printed as a JSON line as soon as it is taken (a run cut short keeps what it printed); the file is
written at the end. At d256 the Mosaic backward does not fit in shared memory, so the forward+backward row of
``pallas_mosaic`` there is the Mosaic forward differentiated by the Triton backward (``"pallas"`` picks that).
"""

from __future__ import annotations

import collections
import gzip
import json
import pathlib
import sys
import tempfile
from typing import Any

import jax
import jax.numpy as jnp

import pallas_kernels as pk
from complexity_jax.bench import _grad_fn, cudnn_or_xla
from complexity_jax.profiling import median_ms
from pallas_kernels._mosaic.softmax import MosaicConfig

SEQ_LEN, BATCH, HEADS, KV_HEADS = 8192, 2, 32, 8
# The variants compared last (BENCHMARKS.md, "ninth session"): the fused backward and in-step pipelining of commits
# 7daf08d and 9da7ea2, and the backward as one launch (69cf58c), were measured with this script and removed (none
# paid at d128). Add a ``MosaicConfig`` here to compare it with the default.
VARIANTS = {"default": MosaicConfig()}
CASES = {"full": False, "causal": True}


def inputs(head_dim: int, seq_len: int = SEQ_LEN):
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (BATCH, seq_len, HEADS, head_dim), jnp.bfloat16)
    k, v = (jax.random.normal(x, (BATCH, seq_len, KV_HEADS, head_dim), jnp.bfloat16) for x in keys[1:3])
    return q, k, v, jax.random.normal(keys[3], q.shape, jnp.float32)


def timed(fn, q, k, v, ct, head_dim: int, causal: bool, **labels) -> dict:
    """``fn`` is a pair of jitted (forward, forward+backward) functions or one function to jit both ways."""
    fwd, fb = fn if isinstance(fn, tuple) else (jax.jit(fn), jax.jit(_grad_fn(fn)))
    pairs = SEQ_LEN * (SEQ_LEN + 1) // 2 if causal else SEQ_LEN * SEQ_LEN
    flops = 4 * BATCH * HEADS * head_dim * pairs
    try:
        fwd_ms = median_ms(fwd, q, k, v, repeats=10)
        fb_ms = median_ms(fb, q, k, v, ct, repeats=10)
        row = dict(labels, head_dim=head_dim, fwd_ms=fwd_ms, fwd_tflops=flops / fwd_ms / 1e9, fwd_bwd_ms=fb_ms,
                   fwd_bwd_tflops=3.5 * flops / fb_ms / 1e9)
    except Exception as e:  # noqa: BLE001 - a variant that fails to compile is a result, not a stop
        row = dict(labels, head_dim=head_dim, error=f"{type(e).__name__}: {str(e)[:300]}")
    print(json.dumps(row), flush=True)
    return row


def check() -> list[dict]:
    """Output and gradients of each variant against the float32 XLA path, on the GPU tests' cases."""
    from tests.test_mosaic_kernels import CASES as TEST_CASES, _op, qkv
    from tests.conftest import relerr

    rows = []
    for case, (b, sq, skv, h, kvh, d, dtype, window, causal) in TEST_CASES.items():
        q, k, v, ct = qkv(b, sq, skv, h, kvh, d, dtype)
        op = _op(window, causal)
        grad = lambda **o: jax.jit(jax.grad(lambda *a: jnp.sum(op(*a, **o).astype(jnp.float32) * ct), (0, 1, 2)))
        want = grad(implementation="xla")(*(x.astype(jnp.float32) for x in (q, k, v)))
        for name, cfg in VARIANTS.items():
            try:
                got = grad(implementation="pallas_mosaic", kernel_config=cfg)(q, k, v)
                errors = [relerr(g, w) for g, w in zip(got, want)]
                nan = any(bool(jnp.isnan(g).any()) for g in got)
                row = dict(part="check", case=case, variant=name, dq=errors[0], dk=errors[1], dv=errors[2], nan=nan)
            except Exception as e:  # noqa: BLE001 - a variant that fails to compile is a result, not a stop
                row = dict(part="check", case=case, variant=name, error=f"{type(e).__name__}: {str(e)[:300]}")
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def config_ab() -> list[dict]:
    rows = []
    for head_dim in (128, 64):
        q, k, v, ct = inputs(head_dim)
        variants = {}
        for case, causal in CASES.items():
            fns = {name: lambda q, k, v, cfg=cfg, causal=causal: pk.flash_attention(
                q, k, v, causal=causal, implementation="pallas_mosaic", kernel_config=cfg)
                for name, cfg in VARIANTS.items()}
            fns["cudnn"] = cudnn_or_xla("cudnn", None, causal=causal)
            variants[case] = {name: (jax.jit(fn), jax.jit(_grad_fn(fn))) for name, fn in fns.items()}
        for rnd in range(2):  # interleaved rounds: the spread between rounds is the noise
            for case, causal in CASES.items():
                for name, fns in variants[case].items():
                    rows.append(timed(fns, q, k, v, ct, head_dim, causal, part="ab", case=case, variant=name,
                                      round=rnd))
    return rows


def window_ab(window: int = 1024) -> list[dict]:
    """The dQ kernel's key tile under a window (W=1024, S=8192 and 32768), beside cuDNN: ``block_kv_dq=128`` was
    adopted on full and causal attention only. ms, 5 back-to-back runs per sample (the GPU's time)."""
    rows, variants = [], {"block_kv_dq=128": MosaicConfig(), "block_kv_dq=64": MosaicConfig(block_kv_dq=64)}
    for seq_len in (8192, 32768):
        q, k, v, ct = inputs(128, seq_len)
        fns = {name: lambda q, k, v, cfg=cfg: pk.flash_attention(q, k, v, window_size=window,
                                                                 implementation="pallas_mosaic", kernel_config=cfg)
               for name, cfg in variants.items()}
        fns["cudnn"] = cudnn_or_xla("cudnn", window)
        jitted = {name: (jax.jit(fn), jax.jit(_grad_fn(fn))) for name, fn in fns.items()}
        for rnd in range(2):
            for name, (fwd, fb) in jitted.items():
                row = dict(part="window", seq_len=seq_len, window=window, variant=name, round=rnd,
                           fwd_ms=median_ms(fwd, q, k, v, repeats=10, calls=5),
                           fwd_bwd_ms=median_ms(fb, q, k, v, ct, repeats=10, calls=5))
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def head_dim_rows() -> list[dict]:
    rows = []
    for head_dim in (64, 256):
        q, k, v, ct = inputs(head_dim)
        for case, causal in CASES.items():
            impls = {"pallas": lambda q, k, v, c=causal: pk.flash_attention(q, k, v, causal=c, implementation="pallas"),
                     "cudnn": cudnn_or_xla("cudnn", None, causal=causal)}
            for impl, fn in impls.items():
                rows.append(timed(fn, q, k, v, ct, head_dim, causal, part="head_dims", case=case, impl=impl))
    return rows


def kernel_ms(fn, *args, runs: int = 3) -> dict[str, Any]:
    """A profiler trace of ``runs`` runs of ``fn(*args)``: each kernel name's GPU time per run (``per_name``, ms) and
    the last run's launches in order (``launches``: name, ms), which tells apart kernels of one name."""
    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(runs):
                jax.block_until_ready(fn(*args))
        events = json.loads(gzip.decompress(next(pathlib.Path(trace_dir).rglob("perfetto_trace.json.gz")).read_bytes()))
    events = events["traceEvents"] if isinstance(events, dict) else events
    processes = {e["pid"]: str(e.get("args", {}).get("name", "")) for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {pid for pid, name in processes.items() if "GPU" in name}
    if not gpu:
        raise RuntimeError(f"no GPU track in the trace, only {sorted(processes.values())}")
    kernels = sorted((e for e in events if e.get("ph") == "X" and e.get("pid") in gpu), key=lambda e: e["ts"])
    totals = collections.Counter()
    for e in kernels:
        totals[e["name"][:120]] += e.get("dur", 0) / 1e3 / runs
    last_run = kernels[len(kernels) - len(kernels) // runs:]
    return dict(per_name=dict(totals.most_common(12)),
                launches=[(e["name"][:60], round(e.get("dur", 0) / 1e3, 4)) for e in last_run][:20])


def profile() -> list[dict]:
    """Where the time of a d128 forward+backward goes, kernel by kernel, for each variant and cuDNN."""
    rows = []
    q, k, v, ct = inputs(128)
    for case, causal in CASES.items():
        fns = {name: lambda q, k, v, cfg=cfg: pk.flash_attention(
            q, k, v, causal=causal, implementation="pallas_mosaic", kernel_config=cfg)
            for name, cfg in VARIANTS.items()}
        fns["cudnn"] = cudnn_or_xla("cudnn", None, causal=causal)
        for name, fn in fns.items():
            try:
                row = dict(part="profile", case=case, variant=name, kernels=kernel_ms(jax.jit(_grad_fn(fn)), q, k, v, ct))
            except Exception as e:  # noqa: BLE001 - a profiler that cannot run is a result, not a stop
                row = dict(part="profile", case=case, variant=name, error=f"{type(e).__name__}: {str(e)[:300]}")
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main(path: str, parts: list[str]) -> None:
    rows = []
    if "check" in parts:
        rows += check()
    if "ab" in parts:
        rows += config_ab()
    if "head_dims" in parts:
        rows += head_dim_rows()
    if "profile" in parts:
        rows += profile()
    if "window" in parts:
        rows += window_ab()
    with open(path, "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    chosen = sys.argv[sys.argv.index("--part") + 1:] if "--part" in sys.argv else ["check", "ab", "head_dims", "profile"]
    main(sys.argv[1], chosen)
