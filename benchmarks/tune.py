"""Sweep Pallas softmax-kernel configs on the GPU (batch 2, 32/8 heads, head_dim 128, bf16 unless named).

``python benchmarks/tune.py OUT.json FORM[,FORM...] SEQ_LEN [HEAD_DIM DTYPE]`` with forms ``causal``, ``window``
(W=1024) and ``sparse`` (block 64, 1 global token, 3 local, 3 random blocks); ``HEAD_DIM DTYPE`` other than 128
bfloat16 sweep the ``OTHER_ROWS`` variants of that ``_CONFIG_TABLE`` row (causal). Forward configs are timed
forward-only, backward configs forward+backward with the default forward; the first variant of each list is the
table's current row. Prints one line per config and writes JSON after every config.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import jax
import jax.numpy as jnp

import pallas_kernels as pk
from complexity_jax.bench import Shape, sparse_visible_pairs, visible_pairs
from complexity_jax.profiling import median_ms
from pallas_kernels._triton.softmax import default_config

# (block_q, block_k, num_warps, num_stages)
VARIANTS = {
    "causal": (
        [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2)],
        [(64, 64, 4, 2), (64, 64, 8, 2), (64, 128, 8, 2), (128, 64, 8, 2), (32, 64, 4, 2)],
    ),
    "sparse": (
        [(64, 64, 8, 3), (64, 64, 4, 3), (64, 64, 4, 2), (64, 64, 4, 4), (128, 64, 8, 3), (128, 64, 4, 3),
         (64, 32, 4, 3), (32, 64, 4, 3), (64, 64, 2, 3)],
        [(64, 64, 4, 2), (64, 64, 8, 2), (64, 64, 4, 3), (32, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2),
         (128, 64, 8, 2)],
    ),
}
VARIANTS["window"] = VARIANTS["causal"]
# (head_dim, dtype) -> (forward variants, backward variants) for the other rows of ``_CONFIG_TABLE``.
OTHER_ROWS = {
    (64, "bfloat16"): (
        [(128, 64, 4, 3), (128, 128, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 4)],
        [(64, 64, 4, 2), (64, 128, 4, 2), (128, 64, 8, 2), (64, 64, 4, 3), (128, 128, 8, 2)],
    ),
    (256, "bfloat16"): (
        [(64, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3), (128, 64, 8, 2), (64, 64, 8, 3), (128, 32, 8, 2)],
        [(32, 32, 8, 2), (32, 32, 4, 2), (64, 32, 8, 2), (32, 64, 8, 2), (64, 64, 8, 1), (32, 32, 8, 1)],
    ),
    (128, "float32"): (
        [(64, 64, 4, 2), (64, 32, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (128, 32, 8, 2), (64, 64, 4, 3)],
        [(32, 32, 4, 2), (32, 32, 4, 1), (32, 64, 4, 2), (64, 32, 4, 2), (16, 32, 4, 2)],
    ),
}


def attention_fn(form: str, config):
    if form == "sparse":
        return lambda q, k, v: pk.sparse_attention(q, k, v, block_size=64, implementation="pallas",
                                                   kernel_config=config)
    window = 1024 if form == "window" else None
    return lambda q, k, v: pk.flash_attention(q, k, v, window_size=window, implementation="pallas",
                                              kernel_config=config)


def visible(form: str, seq_len: int) -> int:
    if form == "sparse":
        return sparse_visible_pairs(pk.SparseMask(32, block_size=64), seq_len)
    return visible_pairs(seq_len, ((1024 if form == "window" else None),) * 32)


def main(out_path: str, forms: list[str], seq_len: int, head_dim: int = 128, dtype: str = "bfloat16") -> None:
    results = []
    shape = Shape(2, seq_len, 32, 8, head_dim, dtype)
    q, k, v = shape.arrays()
    ct = jax.random.normal(jax.random.key(1), q.shape, jnp.float32)
    other_row = (head_dim, dtype) != (128, "bfloat16")
    base = default_config(seq_len, seq_len, head_dim, jnp.dtype(dtype), unlimited=other_row)
    for form in forms:
        flops = 4.0 * 2 * head_dim * visible(form, seq_len)
        fwd, bwd = OTHER_ROWS[head_dim, dtype] if other_row else VARIANTS[form]
        variants = [("fwd", dataclasses.replace(base, block_q=a, block_k=b, num_warps=w, num_stages=s))
                    for a, b, w, s in fwd]
        variants += [("fwd+bwd", dataclasses.replace(base, block_q_bwd=a, block_k_bwd=b, num_warps_bwd=w,
                                                     num_stages_bwd=s)) for a, b, w, s in bwd]
        for kind, config in variants:
            fn = attention_fn(form, config)
            try:
                if kind == "fwd":
                    ms = median_ms(jax.jit(fn), q, k, v, repeats=10)
                else:
                    grad = jax.grad(lambda a, b, c: jnp.sum(fn(a, b, c).astype(jnp.float32) * ct), argnums=(0, 1, 2))
                    ms = median_ms(jax.jit(grad), q, k, v, repeats=10)
                tflops = (flops if kind == "fwd" else 3.5 * flops) / ms / 1e9
                note = ""
            except Exception as e:  # a config the lowering rejects is reported, not fatal
                ms, tflops, note = None, None, f"{type(e).__name__}: {str(e)[:80]}"
            results.append(dict(form=form, seq_len=seq_len, head_dim=head_dim, dtype=dtype, kind=kind,
                                config=dataclasses.asdict(config), ms=ms, tflops=tflops, note=note))
            print(f"{form} S={seq_len} d={head_dim} {dtype} {kind:8s} {config} -> {ms} ms {tflops} TF/s {note}",
                  flush=True)
            with open(out_path, "w") as f:
                json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "results": results}, f,
                          indent=1)


if __name__ == "__main__":
    row = (int(sys.argv[4]), sys.argv[5]) if len(sys.argv) > 5 else ()
    main(sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]), *row)
