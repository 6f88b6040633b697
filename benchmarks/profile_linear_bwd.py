"""Time each kernel of the causal linear-attention backward on its own, per (chunk, warps) variant.

``python benchmarks/profile_linear_bwd.py OUT.json SEQ_LEN``: batch 2, 32 heads (no GQA), head_dim 128, bf16, elu
map. Rows: the forward, the forward state walk and the reverse state-cotangent walk per (tile, warps, stages), and
the chunk-parallel dq and dk/dv kernels per (chunk, warps). The JSON is rewritten after every row.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp

from complexity_jax.bench import Shape
from complexity_jax.profiling import median_ms
from pallas_kernels._triton import linear

WALKS = [(64, 8, 2), (64, 8, 3)]  # (tile, warps, stages), chunk 128
CHUNK_KERNELS = [(128, 8), (64, 8), (64, 4)]  # (chunk, warps) of the chunk-parallel kernels


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

    def launch(warps, stages):
        linear.compiler_params = lambda num_warps, num_stages: original_params(warps, stages)

    config = lambda chunk, tile: linear._Config("elu", True, chunk, False, tile, chunk)
    fwd_cfg = config(64, linear._TILE)
    out, _, _, den = jax.jit(lambda *a: linear._forward(fwd_cfg, *a))(q, k, v, kv0, ksum0)
    record("forward", dict(chunk=64), lambda *a: linear._forward(fwd_cfg, *a), q, k, v, kv0, ksum0)
    cfg = config(128, linear._TILE)
    _, _, kv_chunks, ksum_chunks = jax.jit(lambda k, v: linear._states(cfg, k, v, kv0, ksum0, True))(k, v)
    _, r = jax.jit(lambda *a: linear._chunk_dq(cfg, *a))(q, k, v, do, out, den, kv_chunks, ksum_chunks)
    _, _, u_chunks, w_chunks = jax.jit(lambda *a: linear._state_grads(cfg, *a, kv0, ksum0))(q, do, den, r)
    for tile, warps, stages in WALKS:
        launch(warps, stages)
        walk_cfg, variant = config(128, tile), dict(chunk=128, tile=tile, warps=warps, stages=stages)
        record("states", variant, lambda k, v, c=walk_cfg: linear._states(c, k, v, kv0, ksum0, True), k, v)
        record("state_grads", variant, lambda *a, c=walk_cfg: linear._state_grads(c, *a, kv0, ksum0), q, do, den, r)
    for chunk, warps in CHUNK_KERNELS:
        launch(warps, 2)
        chunk_cfg, variant = config(chunk, linear._TILE), dict(chunk=chunk, warps=warps)
        if chunk != 128:
            _, _, kv_c, ksum_c = jax.jit(lambda k, v, c=chunk_cfg: linear._states(c, k, v, kv0, ksum0, True))(k, v)
            _, _, u_c, w_c = jax.jit(lambda *a, c=chunk_cfg: linear._state_grads(c, *a, kv0, ksum0))(q, do, den, r)
        else:
            kv_c, ksum_c, u_c, w_c = kv_chunks, ksum_chunks, u_chunks, w_chunks
        record("chunk_dq", variant, lambda *a, c=chunk_cfg: linear._chunk_dq(c, *a), q, k, v, do, out, den, kv_c,
               ksum_c)
        record("chunk_dkdv", variant, lambda *a, c=chunk_cfg: linear._chunk_dkdv(c, *a), q, k, v, do, den, r, u_c,
               w_c)
    linear.compiler_params = original_params


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
