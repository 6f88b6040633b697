"""Counts the MMA instructions in the PTX that XLA compiles for our Pallas causal forward kernel.

Run with ``XLA_FLAGS=--xla_dump_to=DIR python benchmarks/pallas_ptx_probe.py DIR``: compiles and runs the
issue-3 causal forward once (batch 2, 32/8 heads, d128, bf16, S=8192), then prints, per dumped PTX file, the
counts of Hopper ``wgmma.mma_async`` and of Ampere-style ``mma.sync`` instructions and of ``ex2.approx``.
"""

from __future__ import annotations

import math
import pathlib
import sys

import jax

from complexity_jax.bench import Shape
from pallas_kernels._triton import softmax


def main(dump_dir: str) -> None:
    q, k, v = Shape(2, 8192, 32, 8, 128, "bfloat16").arrays()
    fn = jax.jit(lambda q, k, v: softmax.softmax_attention(q, k, v, windows=(None,) * 32, causal=True,
                                                           softmax_scale=1 / math.sqrt(128)))
    jax.block_until_ready(fn(q, k, v))
    for path in sorted(pathlib.Path(dump_dir).glob("*.ptx")):
        text = path.read_text()
        print(path.name, {name: text.count(name) for name in ("wgmma.mma_async", "mma.sync", "ex2.approx",
                                                               "cp.async", "ld.global")})


if __name__ == "__main__":
    main(sys.argv[1])
