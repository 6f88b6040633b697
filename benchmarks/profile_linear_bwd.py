"""Time each kernel of the causal linear-attention backward on its own, per (chunk, warps) variant.

``python benchmarks/profile_linear_bwd.py OUT.json SEQ_LEN``: batch 2, 32 heads (no GQA), head_dim 128, bf16, elu
map. Rows: the forward, the r = -do.out/den reduction (XLA), the forward state walk, the reverse state-cotangent
walk and the chunk-parallel dq and dk/dv kernels. The JSON is rewritten after every row.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp

from complexity_jax.bench import Shape
from complexity_jax.profiling import median_ms
from pallas_kernels._triton import linear

VARIANTS = [(128, 8), (64, 8), (64, 4), (128, 4)]  # (chunk, warps) of the three backward kernels


def main(out_path: str, seq_len: int) -> None:
    q, k, v = Shape(2, seq_len, 32, 32, 128, "bfloat16").arrays()
    do = jax.random.normal(jax.random.key(1), q.shape, q.dtype)
    kv0 = jnp.zeros((2, 32, 128, 128), jnp.float32)
    ksum0 = jnp.zeros((2, 32, 128), jnp.float32)
    original_params, results = linear.compiler_params, []

    def record(name, chunk, warps, fn, *args):
        try:
            row = dict(kernel=name, chunk=chunk, warps=warps, ms=median_ms(jax.jit(fn), *args, repeats=20), note="")
        except Exception as e:  # a variant the lowering rejects is reported, not fatal
            row = dict(kernel=name, chunk=chunk, warps=warps, ms=None, note=f"{type(e).__name__}: {str(e)[:120]}")
        results.append(row)
        print(row, flush=True)
        with open(out_path, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "seq_len": seq_len,
                       "results": results}, f, indent=1)

    fwd_cfg = linear._Config("elu", True, 64, False, linear._TILE, 64)
    out, _, _, den = jax.jit(lambda *a: linear._forward(fwd_cfg, *a))(q, k, v, kv0, ksum0)
    record("forward", 64, 8, lambda *a: linear._forward(fwd_cfg, *a), q, k, v, kv0, ksum0)
    r_of = lambda do, out, den: -jnp.einsum("bshd,bshd->bhs", do.astype(jnp.float32), out.astype(jnp.float32)) / den
    r = jax.jit(r_of)(do, out, den)
    record("r (xla)", 0, 0, r_of, do, out, den)
    for chunk, warps in VARIANTS:
        linear.compiler_params = lambda num_warps, num_stages: original_params(warps, num_stages)
        cfg = linear._Config("elu", True, chunk, False, linear._TILE, chunk)
        states = lambda k, v, cfg=cfg: linear._states(cfg, k, v, kv0, ksum0, per_chunk=True)
        grads = lambda q, do, den, r, cfg=cfg: linear._state_grads(cfg, q, do, den, r, kv0, ksum0)
        try:
            _, _, kv_chunks, ksum_chunks = jax.jit(states)(k, v)
            _, _, u_chunks, w_chunks = jax.jit(grads)(q, do, den, r)
        except Exception as e:
            print(chunk, warps, type(e).__name__, str(e)[:200], flush=True)
            continue
        record("states", chunk, warps, states, k, v)
        record("state_grads", chunk, warps, grads, q, do, den, r)
        record("chunk_dq", chunk, warps, lambda *a, cfg=cfg: linear._chunk_dq(cfg, *a), q, k, v, do, den, r,
               kv_chunks, ksum_chunks)
        record("chunk_dkdv", chunk, warps, lambda *a, cfg=cfg: linear._chunk_dkdv(cfg, *a), q, k, v, do, den, r,
               u_chunks, w_chunks)
    linear.compiler_params = original_params


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
