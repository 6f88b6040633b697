"""Interleaved A/B of two linear-attention designs, fwd and fwd+bwd at batch 2, 32 heads, d128, bf16, elu, causal.

``python benchmarks/experiments/ab_linear.py OUT.json OLD_NAME`` with the older module checked out beside the current one as
``pallas_kernels/_triton/linear_old.py`` (``git show COMMIT:pallas_kernels/_triton/linear.py``); ``OLD_NAME`` labels
it in the JSON. Used for b15d2b3's sequential backward walks vs the chunk-parallel backward, and for a417f11's
sequential causal forward vs the chunk-parallel forward.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp

from complexity_jax.bench import Shape
from complexity_jax.profiling import median_ms
from pallas_kernels._triton import linear, linear_old


def main(out_path: str, old_name: str) -> None:
    results = []
    for seq_len in (8192, 32768):
        q, k, v = Shape(2, seq_len, 32, 32, 128, "bfloat16").arrays()
        ct = jax.random.normal(jax.random.key(1), q.shape, jnp.float32)
        compiled = {}
        for name, module in (("current", linear), (old_name, linear_old)):
            fn = lambda a, b, c, m=module: m.linear_attention(a, b, c, feature_map="elu", causal=True,
                                                               initial_state=None)[0]
            grad = jax.grad(lambda a, b, c, fn=fn: jnp.sum(fn(a, b, c).astype(jnp.float32) * ct), argnums=(0, 1, 2))
            compiled[name, "fwd"] = jax.jit(fn).lower(q, k, v).compile()
            compiled[name, "fwd+bwd"] = jax.jit(grad).lower(q, k, v).compile()
        for r in range(3):
            for name, what in list(compiled)[:: 1 if r % 2 == 0 else -1]:
                ms = median_ms(compiled[name, what], q, k, v, repeats=20)
                results.append(dict(seq_len=seq_len, version=name, timed=what, round=r, ms=ms))
                print(results[-1], flush=True)
                with open(out_path, "w") as f:
                    json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "results": results},
                              f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
