"""Sweep the causal linear-attention kernels' head_dim tile and chunk size on the GPU.

``python benchmarks/tune_linear.py OUT.json SEQ_LEN``: batch 2, 32 heads (no GQA), head_dim 128, bf16, elu map;
forward and forward+backward per (tile, chunk). Prints one line per variant and writes JSON.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp

from complexity_jax.bench import Shape
from complexity_jax.profiling import median_ms
from pallas_kernels._triton import linear

VARIANTS = [(64, 64), (32, 64), (128, 64), (64, 128), (32, 128), (64, 32)]  # (head_dim tile, chunk)


def main(out_path: str, seq_len: int) -> None:
    q, k, v = Shape(2, seq_len, 32, 32, 128, "bfloat16").arrays()
    ct = jax.random.normal(jax.random.key(1), q.shape, jnp.float32)
    default_tile, results = linear._TILE, []
    for tile, chunk in VARIANTS:
        linear._TILE = tile
        fn = lambda a, b, c: linear.linear_attention(a, b, c, feature_map="elu", causal=True, initial_state=None,
                                                     chunk_size=chunk)[0]
        grad = jax.grad(lambda a, b, c: jnp.sum(fn(a, b, c).astype(jnp.float32) * ct), argnums=(0, 1, 2))
        try:
            row = dict(tile=tile, chunk=chunk, seq_len=seq_len, fwd_ms=median_ms(jax.jit(fn), q, k, v, repeats=10),
                       fwd_bwd_ms=median_ms(jax.jit(grad), q, k, v, repeats=10), note="")
        except Exception as e:  # a variant the lowering rejects is reported, not fatal
            row = dict(tile=tile, chunk=chunk, seq_len=seq_len, fwd_ms=None, fwd_bwd_ms=None,
                       note=f"{type(e).__name__}: {str(e)[:100]}")
        results.append(row)
        print(row, flush=True)
    linear._TILE = default_tile
    with open(out_path, "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "results": results}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
