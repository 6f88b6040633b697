"""Interleaved A/B of a scheduling choice of the softmax kernels (batch 2, 32/8 heads, head_dim 128, bf16): the
sparse dK/dV pass with long key rows split into pieces (``block_tables.split_long_rows``) or not.

The same script at commit e696fe3 also switched the causal query-block launch order (longest rows first); that
made no difference beyond noise (BENCHMARKS.md) and was removed.

``python benchmarks/experiments/ab_schedule.py OUT.json [ROUNDS]``. Both variants are compiled first, then timed alternately, so that
drift (clocks, other tenants) hits both sides alike; the JSON is rewritten after every measurement.
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

SEQ_LENS = (16384, 65536)
PIECES = softmax._Sparse.key_pieces


def set_pieces(on: bool) -> None:
    jax.clear_caches()  # the kernels' inner jits would otherwise reuse the trace of the other variant
    softmax._Sparse.key_pieces = PIECES if on else (lambda self, st, bq, bk: None)


def main(out_path: str, rounds: int) -> None:
    results = []
    for seq_len in SEQ_LENS:
        q, k, v = Shape(2, seq_len, 32, 8, 128, "bfloat16").arrays()
        ct = jax.random.normal(jax.random.key(1), q.shape, jnp.bfloat16)
        flops = 4.0 * 2 * 128 * sparse_visible_pairs(pk.SparseMask(32, block_size=64), seq_len) * 3.5
        attend = lambda q, k, v: pk.sparse_attention(q, k, v, block_size=64, implementation="pallas")
        grad = jax.grad(lambda a, b, c: jnp.sum(attend(a, b, c).astype(jnp.float32) * ct), argnums=(0, 1, 2))
        compiled = {}
        for on in (True, False):
            set_pieces(on)
            compiled[on] = jax.jit(grad).lower(q, k, v).compile()
        for r in range(rounds):
            for on in ((True, False) if r % 2 == 0 else (False, True)):
                ms = median_ms(compiled[on], q, k, v, repeats=20)
                results.append(dict(seq_len=seq_len, kind="fwd+bwd", pieces=on, round=r, ms=ms,
                                    tflops=flops / ms / 1e9))
                print(f"sparse S={seq_len:6d} fwd+bwd pieces={'on ' if on else 'off'} round {r}: "
                      f"{ms:.3f} ms {flops / ms / 1e9:.1f} TF/s", flush=True)
                with open(out_path, "w") as f:
                    json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "results": results},
                              f, indent=1)
    set_pieces(True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3)
