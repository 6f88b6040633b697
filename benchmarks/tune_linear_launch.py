"""Sweep the causal linear-attention kernels' warps, stages and chunk on the GPU.

``python benchmarks/tune_linear_launch.py OUT.json SEQ_LEN``: batch 2, 32 heads, head_dim 128, bf16, elu map;
forward+backward per (warps, stages, chunk) of every kernel (``KERNELS``).
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp

from complexity_jax.bench import Shape
from complexity_jax.profiling import median_ms
from pallas_kernels._triton import linear

KERNELS = (
    "linear_attention_states", "linear_attention_chunk_out", "linear_attention_state_grads",
    "linear_attention_chunk_dq", "linear_attention_chunk_dkdv",
)
VARIANTS = [(8, 2, 128), (8, 2, 64), (4, 2, 64), (4, 2, 128), (8, 3, 64), (4, 3, 64), (8, 2, 32)]  # (warps, stages, chunk)


def main(out_path: str, seq_len: int) -> None:
    q, k, v = Shape(2, seq_len, 32, 32, 128, "bfloat16").arrays()
    ct = jax.random.normal(jax.random.key(1), q.shape, jnp.float32)
    original_call, original_params = linear._call, linear.compiler_params
    results = []
    for warps, stages, chunk in VARIANTS:

        def call(kernel, cfg, grid, in_specs, out_specs, out_shape, name, d, **kwargs):
            if name in KERNELS:
                linear.compiler_params = lambda num_warps, num_stages: original_params(warps, stages)
            try:
                return original_call(kernel, cfg, grid, in_specs, out_specs, out_shape, name, d, **kwargs)
            finally:
                linear.compiler_params = original_params

        linear._call = call
        fn = lambda a, b, c: linear.linear_attention(a, b, c, feature_map="elu", causal=True, initial_state=None,
                                                     chunk_size=chunk)[0]
        grad = jax.grad(lambda a, b, c: jnp.sum(fn(a, b, c).astype(jnp.float32) * ct), argnums=(0, 1, 2))
        try:
            row = dict(warps=warps, stages=stages, chunk=chunk, seq_len=seq_len,
                       fwd_bwd_ms=median_ms(jax.jit(grad), q, k, v, repeats=10), note="")
        except Exception as e:  # a variant the lowering rejects is reported, not fatal
            row = dict(warps=warps, stages=stages, chunk=chunk, seq_len=seq_len, fwd_bwd_ms=None,
                       note=f"{type(e).__name__}: {str(e)[:100]}")
        results.append(row)
        print(row, flush=True)
        with open(out_path, "w") as f:  # after every variant, so a time limit keeps what ran
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "results": results}, f,
                      indent=1)
    linear._call = original_call


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
