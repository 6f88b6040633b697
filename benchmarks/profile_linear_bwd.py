"""Time each kernel of the causal linear-attention backward on its own, per (chunk, warps) variant.

``python benchmarks/profile_linear_bwd.py OUT.json SEQ_LEN``: batch 2, 32 heads (no GQA), head_dim 128, bf16, elu
map. Rows: the forward, then per (chunk, warps) the two state walks (one launch) and the chunk-parallel dq and dk/dv
kernels. The JSON is rewritten after every row.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp

from complexity_jax.bench import Shape
from complexity_jax.profiling import median_ms
from pallas_kernels._triton import linear

CHUNK_KERNELS = [(128, 8), (64, 8), (64, 4)]  # (chunk, warps) of every backward kernel


def main(out_path: str, seq_len: int) -> None:
    q, k, v = Shape(2, seq_len, 32, 32, 128, "bfloat16").arrays()
    do = jax.random.normal(jax.random.key(1), q.shape, q.dtype)
    kv0 = jnp.zeros((2, 32, 128, 128), jnp.float32)
    ksum0 = jnp.zeros((2, 32, 128), jnp.float32)
    original_params, results = linear.compiler_params, []

    def record(name, variant, fn, *args):
        try:
            row = dict(kernel=name, **variant, ms=median_ms(jax.jit(fn), *args, repeats=20), note="")
        except Exception as e:  # a variant the lowering rejects is reported, not fatal
            row = dict(kernel=name, **variant, ms=None, note=f"{type(e).__name__}: {str(e)[:120]}")
        results.append(row)
        print(row, flush=True)
        with open(out_path, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "seq_len": seq_len,
                       "results": results}, f, indent=1)

    config = lambda chunk: linear._Config("elu", True, chunk, False, linear._TILE, chunk)
    fwd_cfg = config(64)
    out, _, _, den = jax.jit(lambda *a: linear._forward(fwd_cfg, *a))(q, k, v, kv0, ksum0)
    record("forward", dict(chunk=64), lambda *a: linear._forward(fwd_cfg, *a), q, k, v, kv0, ksum0)
    for chunk, warps in CHUNK_KERNELS:
        linear.compiler_params = lambda num_warps, num_stages, w=warps: original_params(w, num_stages)
        cfg, variant = config(chunk), dict(chunk=chunk, warps=warps)
        walks = lambda *a, c=cfg: linear._walks(c, *a, kv0, ksum0, kv0, ksum0)
        try:
            kv_c, ksum_c, _, _, r, u_c, w_c = jax.jit(walks)(q, k, v, do, out, den)
        except Exception as e:
            print(chunk, warps, type(e).__name__, str(e)[:200], flush=True)
            continue
        record("state_walks", variant, walks, q, k, v, do, out, den)
        record("chunk_dq", variant, lambda *a, c=cfg: linear._chunk_dq(c, *a), q, k, v, do, den, r, kv_c, ksum_c)
        record("chunk_dkdv", variant, lambda *a, c=cfg: linear._chunk_dkdv(c, *a), q, k, v, do, den, r, u_c, w_c)
    linear.compiler_params = original_params


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
