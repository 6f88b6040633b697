"""Time each kernel of causal linear attention on its own, per (chunk, warps) variant.

``python benchmarks/profile_linear.py OUT.json SEQ_LEN``: batch 2, 32 heads (no GQA), head_dim 128, bf16, elu map.
Rows: the whole forward, the state walk and the chunk-parallel output kernel per (chunk, warps); the reverse
state-cotangent walk, and the chunk-parallel dq and dk/dv kernels per (chunk, warps). The JSON is rewritten after
every row.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp

from complexity_jax.bench import Shape
from complexity_jax.profiling import median_ms
from pallas_kernels._triton import linear

VARIANTS = [(128, 8), (128, 4)]  # (chunk, warps)


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

    for chunk, warps in VARIANTS:
        linear.compiler_params = lambda num_warps, num_stages, w=warps: original_params(w, 2)
        cfg, variant = linear._Config("elu", True, chunk, False, linear._TILE), dict(chunk=chunk, warps=warps)
        out, _, _, den, states = jax.jit(lambda *a, c=cfg: linear._forward(c, *a))(q, k, v, kv0, ksum0)
        _, r = jax.jit(lambda *a, c=cfg: linear._chunk_dq(c, *a))(q, k, v, do, out, den, states)
        _, _, grads = jax.jit(lambda *a, c=cfg: linear._state_grads(c, *a, kv0, ksum0))(q, do, den, r)
        record("forward", variant, lambda *a, c=cfg: linear._forward(c, *a), q, k, v, kv0, ksum0)
        record("states", variant, lambda *a, c=cfg: linear._states(c, *a), k, v, kv0, ksum0)
        record("state_grads", variant, lambda *a, c=cfg: linear._state_grads(c, *a, kv0, ksum0), q, do, den, r)
        record("chunk_dq", variant, lambda *a, c=cfg: linear._chunk_dq(c, *a), q, k, v, do, out, den, states)
        record("chunk_dkdv", variant, lambda *a, c=cfg: linear._chunk_dkdv(c, *a), q, k, v, do, den, r, grads)
    linear.compiler_params = original_params


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
