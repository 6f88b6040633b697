"""Interleaved A/B of softmax-kernel variants beside cuDNN, forward and forward+backward, on the issue-3 shapes.

``python benchmarks/ab_softmax.py OUT.json OLD_NAME [CASES]``: batch 2, 32 query / 8 KV heads, head_dim 128, bf16,
S=8192; ``CASES`` (comma-separated, default ``causal,window``) from ``causal``, ``window`` (W=1024) and ``sparse``
(BigBird block 64, 1 global token, 3 local, 3 random blocks; no cuDNN peer). ``pallas_kernels/_triton/softmax.py`` (current) is compared with an older version
checked out beside it as ``softmax_old.py`` (``git show COMMIT:pallas_kernels/_triton/softmax.py``), labelled
``OLD_NAME``; cuDNN runs in the same rounds as the yardstick. Three rounds, the order reversed every other round.
"""

from __future__ import annotations

import json
import math
import sys

import jax
import jax.numpy as jnp

import pallas_kernels as pk
from complexity_jax.bench import Shape, _grad_fn, cudnn_or_xla, sparse_visible_pairs, visible_pairs
from complexity_jax.profiling import median_ms
from pallas_kernels._triton import softmax, softmax_old

SEQ_LEN, WINDOW = 8192, 1024


def case_impls(case: str, shape: Shape, old_name: str) -> tuple[dict, float]:
    """The timed functions of one case (ours now, ours before, cuDNN where it has the mask) and its forward FLOPs."""
    scale = 1 / math.sqrt(shape.head_dim)
    modules = (("current", softmax), (old_name, softmax_old))
    if case == "sparse":
        mask = pk.SparseMask(shape.num_heads, block_size=64)
        flops = 4 * shape.batch * shape.head_dim * sparse_visible_pairs(mask, SEQ_LEN)
        impls = {name: lambda a, b, c, m=module: m.sparse_attention(a, b, c, mask=mask, softmax_scale=scale)
                 for name, module in modules}
        return impls, flops
    window = WINDOW if case == "window" else None
    flops = 4 * shape.batch * shape.head_dim * visible_pairs(SEQ_LEN, (window,) * shape.num_heads)
    impls = {name: lambda a, b, c, m=module: m.softmax_attention(
        a, b, c, windows=(window,) * shape.num_heads, causal=True, softmax_scale=scale) for name, module in modules}
    impls["cudnn"] = cudnn_or_xla("cudnn", window)
    return impls, flops


def main(out_path: str, old_name: str, cases: list[str]) -> None:
    shape = Shape(2, SEQ_LEN, 32, 8, 128, "bfloat16")
    q, k, v = shape.arrays()
    ct = jax.random.normal(jax.random.key(1), q.shape, jnp.float32)
    compiled, results = {}, []
    for case in cases:
        impls, flops = case_impls(case, shape, old_name)
        for name, fn in impls.items():
            compiled[case, name, "fwd"] = (jax.jit(fn).lower(q, k, v).compile(), (q, k, v), flops)
            compiled[case, name, "fwd+bwd"] = (jax.jit(_grad_fn(fn)).lower(q, k, v, ct).compile(), (q, k, v, ct),
                                               3.5 * flops)
    for r in range(3):
        for key in list(compiled)[:: 1 if r % 2 == 0 else -1]:
            fn, args, flops = compiled[key]
            ms = median_ms(fn, *args, repeats=20)
            case, name, timed = key
            results.append(dict(case=case, impl=name, timed=timed, round=r, ms=ms, tflops=flops / ms / 1e9))
            print(results[-1], flush=True)
            with open(out_path, "w") as f:
                json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "seq_len": SEQ_LEN,
                           "results": results}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], (sys.argv[3] if len(sys.argv) > 3 else "causal,window").split(","))
