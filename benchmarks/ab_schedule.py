"""Interleaved A/B of two scheduling choices of the softmax kernels (batch 2, 32/8 heads, head_dim 128, bf16).

- ``order``: ``softmax._LONGEST_QUERY_BLOCKS_FIRST`` on/off (causal forward and dQ launch the longest rows first);
- ``pieces``: the sparse dK/dV pass with long key rows split into pieces (``block_tables.split_long_rows``) or not.

``python benchmarks/ab_schedule.py OUT.json [ROUNDS]``. Both variants are compiled first, then timed alternately, so that
drift (clocks, other tenants) hits both sides alike; the JSON is rewritten after every measurement.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp

import pallas_kernels as pk
from complexity_jax.bench import Shape, sparse_visible_pairs, visible_pairs
from complexity_jax.profiling import median_ms
from pallas_kernels._triton import softmax

# (form, seq_len, pass, switch)
CASES = [
    ("causal", 8192, "fwd", "order"),
    ("causal", 8192, "fwd+bwd", "order"),
    ("causal", 32768, "fwd", "order"),
    ("causal", 32768, "fwd+bwd", "order"),
    ("window", 8192, "fwd+bwd", "order"),
    ("sparse", 16384, "fwd", "order"),
    ("sparse", 16384, "fwd+bwd", "pieces"),
    ("sparse", 65536, "fwd+bwd", "pieces"),
]


def attention_fn(form: str):
    if form == "sparse":
        return lambda q, k, v: pk.sparse_attention(q, k, v, block_size=64, implementation="pallas")
    window = 1024 if form == "window" else None
    return lambda q, k, v: pk.flash_attention(q, k, v, window_size=window, implementation="pallas")


def set_switch(switch: str, on: bool) -> None:
    jax.clear_caches()
    if switch == "order":
        softmax._LONGEST_QUERY_BLOCKS_FIRST = on
    else:
        softmax._Sparse.key_pieces = PIECES if on else (lambda self, st, bq, bk: None)


PIECES = softmax._Sparse.key_pieces


def main(out_path: str, rounds: int) -> None:
    results = []
    for form, seq_len, kind, switch in CASES:
        q, k, v = Shape(2, seq_len, 32, 8, 128, "bfloat16").arrays()
        ct = jax.random.normal(jax.random.key(1), q.shape, jnp.bfloat16)
        if form == "sparse":
            pairs = sparse_visible_pairs(pk.SparseMask(32, block_size=64), seq_len)
        else:
            pairs = visible_pairs(seq_len, ((1024 if form == "window" else None),) * 32)
        flops = 4.0 * 2 * 128 * pairs * (1.0 if kind == "fwd" else 3.5)
        compiled = {}
        for on in (True, False):
            set_switch(switch, on)
            fn = attention_fn(form)
            if kind != "fwd":
                loss = lambda a, b, c, fn=fn: jnp.sum(fn(a, b, c).astype(jnp.float32) * ct)
                fn = jax.grad(loss, argnums=(0, 1, 2))
            compiled[on] = jax.jit(fn).lower(q, k, v).compile()
        for r in range(rounds):
            for on in ((True, False) if r % 2 == 0 else (False, True)):
                ms = median_ms(compiled[on], q, k, v, repeats=20)
                results.append(dict(form=form, seq_len=seq_len, kind=kind, switch=switch, on=on, round=r, ms=ms,
                                    tflops=flops / ms / 1e9))
                print(f"{form:6s} S={seq_len:6d} {kind:8s} {switch}={'on ' if on else 'off'} round {r}: "
                      f"{ms:.3f} ms {flops / ms / 1e9:.1f} TF/s", flush=True)
                with open(out_path, "w") as f:
                    json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "results": results},
                              f, indent=1)
        set_switch(switch, True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3)
