"""Runs the Triton IR that Pallas emits for our causal forward through Python Triton's own compiler.

``python benchmarks/experiments/pallas_ttir_in_triton.py OUT.json``: lowers our forward (issue-3 shape: batch 2, 32/8 heads,
d128, bf16, causal, S=8192) with ``pallas_call(debug=True)``, strips the debug locations from the printed module,
compiles it with ``triton.compile`` (num_warps 8, num_stages 3, as ``KernelConfig`` asks) and times it on torch
tensors beside the same kernel run by JAX (XLA's Triton pipeline). Same IR, two compilers: a gap is XLA's
pipeline, no gap means the cost is in the IR the lowering emits. Also reports the PTX's MMA instruction counts.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import re
import sys

import jax
import numpy as np
import torch
import triton

from complexity_jax.bench import Shape
from pallas_kernels._triton import softmax

SHAPE = Shape(2, 8192, 32, 8, 128, "bfloat16")


def pallas_ttir(fn, *args) -> str:
    """The Triton module of the forward kernel, without debug locations."""
    original = softmax.pl.pallas_call
    softmax.pl.pallas_call = functools.partial(original, debug=True)
    printed = io.StringIO()
    jax.clear_caches()  # lowering is cached: re-lower so that the debug print happens
    try:
        with contextlib.redirect_stdout(printed):
            jax.jit(fn).lower(*args)
    finally:
        softmax.pl.pallas_call = original
    text = printed.getvalue()
    start = text.index("module @softmax_attention_fwd {")
    module = text[start:text.index("\n}", start) + 2]
    module = re.sub(r' \[unknown\]| "[^"\n]*"\(#loc\d+\)| \(#loc\d+\)', "", module)
    return module.replace("module @softmax_attention_fwd", "module", 1)


def main(out_path: str) -> None:
    q, k, v = SHAPE.arrays()
    scale = 1 / math.sqrt(SHAPE.head_dim)
    fn = lambda q, k, v: softmax.softmax_attention(q, k, v, windows=(None,) * SHAPE.num_heads, causal=True,
                                                   softmax_scale=scale)
    flops = 4 * SHAPE.batch * SHAPE.num_heads * SHAPE.head_dim * SHAPE.seq_len * (SHAPE.seq_len + 1) / 2
    results = {"triton": triton.__version__, "device": torch.cuda.get_device_name()}

    path = "/tmp/pallas_fwd.ttir"
    with open(path, "w") as f:
        f.write(pallas_ttir(fn, q, k, v))
    kernel = triton.compile(path, options=dict(num_warps=8, num_stages=3))
    ptx = kernel.asm["ptx"]
    results["ptx"] = {n: ptx.count(n) for n in ("wgmma.mma_async", "mma.sync", "ex2.approx", "cp.async")}
    windows = torch.tensor(np.asarray(softmax._window_array((None,) * SHAPE.num_heads)), device="cuda")
    tq, tk, tv = (torch.from_dlpack(x) for x in (q, k, v))
    out = torch.empty_like(tq)
    lse = torch.empty(SHAPE.batch, SHAPE.num_heads, SHAPE.seq_len, device="cuda", dtype=torch.float32)
    grid = (SHAPE.seq_len // 128, SHAPE.batch, SHAPE.num_heads)
    run = lambda: kernel[grid](windows, tq, tk, tv, out, lse)
    run()
    torch.cuda.synchronize()
    want = torch.from_dlpack(jax.jit(fn)(q, k, v))
    results["max_abs_diff_vs_jax"] = float((out.float() - want.float()).abs().max())
    for round_ in range(3):  # interleaved, both timed the same way
        jax_fn = jax.jit(fn)
        ms = triton.testing.do_bench(lambda: jax.block_until_ready(jax_fn(q, k, v)), rep=300)
        results[f"jax_xla_pipeline_{round_}"] = dict(ms=ms, tflops=flops / ms / 1e9)
        ms = triton.testing.do_bench(run, rep=300)
        results[f"python_triton_pipeline_{round_}"] = dict(ms=ms, tflops=flops / ms / 1e9)
    print(results, flush=True)
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
