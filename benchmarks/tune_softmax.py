"""Sweep Pallas softmax-kernel configs on the GPU (batch 2, 32/8 heads, head_dim 128, bf16).

Forward configs are timed forward-only; backward configs forward+backward with the default forward.
Prints one line per config and writes JSON to argv[1].
"""

from __future__ import annotations

import dataclasses
import json
import sys

import jax
import jax.numpy as jnp

import pallas_kernels as pk
from complexity_jax.bench import Shape, visible_pairs
from complexity_jax.profiling import median_ms
from pallas_kernels._triton.softmax import KernelConfig, default_config

FWD = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 32, 4, 4), (64, 64, 4, 3), (128, 64, 8, 2),
       (128, 128, 8, 2), (64, 128, 4, 3)]
BWD = [(64, 64, 8, 2), (64, 64, 4, 2), (64, 64, 4, 3), (32, 64, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2),
       (128, 128, 8, 2), (32, 32, 4, 2), (64, 32, 4, 2)]


def main(out_path: str) -> None:
    results = []
    for window in (None, 1024):
        shape = Shape(2, 8192, 32, 8, 128, "bfloat16")
        q, k, v = shape.arrays()
        ct = jax.random.normal(jax.random.key(1), q.shape, jnp.float32)
        flops = 4.0 * 2 * 128 * visible_pairs(8192, (window,) * 32)
        base = default_config(8192, 8192, 128, jnp.bfloat16)

        def run(config, backward):
            fn = lambda a, b, c: pk.flash_attention(a, b, c, window_size=window, implementation="pallas",
                                                    kernel_config=config)
            if not backward:
                return median_ms(jax.jit(fn), q, k, v, repeats=10)
            grad = jax.grad(lambda a, b, c: jnp.sum(fn(a, b, c).astype(jnp.float32) * ct), argnums=(0, 1, 2))
            return median_ms(jax.jit(grad), q, k, v, repeats=10)

        variants = [("fwd", dataclasses.replace(base, block_q=a, block_k=b, num_warps=w, num_stages=s))
                    for a, b, w, s in FWD]
        variants += [("fwd+bwd", dataclasses.replace(base, block_q_bwd=a, block_k_bwd=b, num_warps_bwd=w,
                                                     num_stages_bwd=s)) for a, b, w, s in BWD]
        for kind, config in variants:
            try:
                ms = run(config, kind == "fwd+bwd")
                tflops = (flops if kind == "fwd" else 3.5 * flops) / ms / 1e9
                note = ""
            except Exception as e:
                ms, tflops, note = None, None, f"{type(e).__name__}: {str(e)[:80]}"
            row = dict(window=window, kind=kind, config=dataclasses.asdict(config), ms=ms, tflops=tflops, note=note)
            results.append(row)
            print(f"W={window} {kind:8s} {config} -> {ms} ms {tflops} TF/s {note}", flush=True)
    with open(out_path, "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "results": results}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
