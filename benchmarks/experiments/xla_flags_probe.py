"""Times our causal and windowed forward (and causal forward+backward) under the XLA flags of this process.

``XLA_FLAGS=... python benchmarks/experiments/xla_flags_probe.py OUT.json LABEL``: issue-3 shape (batch 2, 32/8 heads, d128,
bf16, S=8192, W=1024). Run once per flag set, each in its own process, to see which of XLA's code-generation
settings for Triton kernels (FMA contraction, flush-to-zero of libdevice's exp2) costs what. Appends one row.
"""

from __future__ import annotations

import json
import math
import os
import sys

import jax
import jax.numpy as jnp

from complexity_jax.bench import Shape, _grad_fn
from complexity_jax.profiling import median_ms
from pallas_kernels._triton import softmax


def main(out_path: str, label: str) -> None:
    shape = Shape(2, 8192, 32, 8, 128, "bfloat16")
    q, k, v = shape.arrays()
    ct = jax.random.normal(jax.random.key(1), q.shape, jnp.float32)
    row = dict(label=label, xla_flags=os.environ.get("XLA_FLAGS", ""), device=jax.devices()[0].device_kind)
    for case, window in (("causal", None), ("window", 1024)):
        fn = lambda a, b, c, w=window: softmax.softmax_attention(a, b, c, windows=(w,) * 32, causal=True,
                                                                softmax_scale=1 / math.sqrt(128))
        row[f"{case}_fwd_ms"] = median_ms(jax.jit(fn), q, k, v, repeats=30)
        row[f"{case}_fwd_bwd_ms"] = median_ms(jax.jit(_grad_fn(fn)), q, k, v, ct, repeats=10)
    print(row, flush=True)
    rows = json.load(open(out_path)) if os.path.exists(out_path) else []
    with open(out_path, "w") as f:
        json.dump(rows + [row], f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
