"""Experiment: does one masked loop over a sparse table row beat the two-phase (full, then partial) loop?

Sparse rows are short (about 7 key tiles at block 64), so the second loop's pipeline prologue may cost more than
the element mask it saves. Times ``pk.sparse_attention`` (S from argv[2], batch 2, 32/8 heads, d128, bf16) both
ways, forward and forward+backward, and writes JSON to argv[1].
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp

import pallas_kernels as pk
from complexity_jax.bench import Shape, sparse_visible_pairs
from complexity_jax.profiling import median_ms
from pallas_kernels._triton import softmax


def one_loop_phases(row):
    block = lambda t: row.blocks_ref[t]
    return softmax._Phase(row.start, row.start, block), softmax._Phase(row.start, row.end, block)


def main(out_path: str, seq_len: int) -> None:
    q, k, v = Shape(2, seq_len, 32, 8, 128, "bfloat16").arrays()
    ct = jax.random.normal(jax.random.key(1), q.shape, jnp.float32)
    flops = 4.0 * 2 * 128 * sparse_visible_pairs(pk.SparseMask(32, block_size=64), seq_len)
    fn = lambda a, b, c: pk.sparse_attention(a, b, c, block_size=64, implementation="pallas")
    grad = jax.grad(lambda a, b, c: jnp.sum(fn(a, b, c).astype(jnp.float32) * ct), argnums=(0, 1, 2))
    two_phase = softmax._TableRow.phases
    results = []
    for name, phases in (("two-phase", two_phase), ("one masked loop", one_loop_phases), ("two-phase again", two_phase)):
        softmax._TableRow.phases = phases
        fwd_ms = median_ms(jax.jit(fn), q, k, v, repeats=20)
        fb_ms = median_ms(jax.jit(grad), q, k, v, repeats=10)
        results.append(dict(variant=name, seq_len=seq_len, fwd_ms=fwd_ms, fwd_tflops=flops / fwd_ms / 1e9,
                            fwd_bwd_ms=fb_ms, fwd_bwd_tflops=3.5 * flops / fb_ms / 1e9))
        print(results[-1], flush=True)
    softmax._TableRow.phases = two_phase
    with open(out_path, "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "results": results}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
