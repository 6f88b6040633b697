"""Mosaic GPU softmax kernels on the H200: an interleaved A/B of ``MosaicConfig`` variants at d128, then the d64 and
d256 rows beside cuDNN (issue 13). Batch 2, 32 query / 8 KV heads, S=8192, bf16; forward and forward+backward ms.

    PYTHONPATH=. python benchmarks/ab_mosaic.py OUT.json [--part ab|head_dims]

Each measurement is printed as a JSON line as soon as it is taken (a run cut short keeps what it printed); the file is
written at the end. At d256 the Mosaic backward does not fit in shared memory, so the forward+backward row of
``pallas_mosaic`` there is the Mosaic forward differentiated by the Triton backward (``"pallas"`` picks that).
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp

import pallas_kernels as pk
from complexity_jax.bench import _grad_fn, cudnn_or_xla
from complexity_jax.profiling import median_ms
from pallas_kernels._mosaic.softmax import MosaicConfig

SEQ_LEN, BATCH, HEADS, KV_HEADS = 8192, 2, 32, 8
VARIANTS = {"default": MosaicConfig(), "stages_bwd3": MosaicConfig(stages_bwd=3)}
CASES = {"full": False, "causal": True}


def inputs(head_dim: int):
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (BATCH, SEQ_LEN, HEADS, head_dim), jnp.bfloat16)
    k, v = (jax.random.normal(x, (BATCH, SEQ_LEN, KV_HEADS, head_dim), jnp.bfloat16) for x in keys[1:3])
    return q, k, v, jax.random.normal(keys[3], q.shape, jnp.float32)


def timed(fn, q, k, v, ct, head_dim: int, causal: bool, **labels) -> dict:
    pairs = SEQ_LEN * (SEQ_LEN + 1) // 2 if causal else SEQ_LEN * SEQ_LEN
    flops = 4 * BATCH * HEADS * head_dim * pairs
    fwd_ms = median_ms(jax.jit(fn), q, k, v, repeats=10)
    fb_ms = median_ms(jax.jit(_grad_fn(fn)), q, k, v, ct, repeats=10)
    row = dict(labels, head_dim=head_dim, fwd_ms=fwd_ms, fwd_tflops=flops / fwd_ms / 1e9, fwd_bwd_ms=fb_ms,
               fwd_bwd_tflops=3.5 * flops / fb_ms / 1e9)
    print(json.dumps(row), flush=True)
    return row


def config_ab() -> list[dict]:
    q, k, v, ct = inputs(128)
    rows = []
    for rnd in range(2):  # interleaved rounds: the spread between rounds is the noise
        for case, causal in CASES.items():
            for name, cfg in VARIANTS.items():
                fn = lambda q, k, v, cfg=cfg, causal=causal: pk.flash_attention(
                    q, k, v, causal=causal, implementation="pallas_mosaic", kernel_config=cfg)
                rows.append(timed(fn, q, k, v, ct, 128, causal, part="ab", case=case, variant=name, round=rnd))
    return rows


def head_dim_rows() -> list[dict]:
    rows = []
    for head_dim in (64, 256):
        q, k, v, ct = inputs(head_dim)
        for case, causal in CASES.items():
            impls = {"pallas": lambda q, k, v, c=causal: pk.flash_attention(q, k, v, causal=c, implementation="pallas"),
                     "cudnn": cudnn_or_xla("cudnn", None, causal=causal)}
            for impl, fn in impls.items():
                rows.append(timed(fn, q, k, v, ct, head_dim, causal, part="head_dims", case=case, impl=impl))
    return rows


def main(path: str, parts: list[str]) -> None:
    rows = []
    if "ab" in parts:
        rows += config_ab()
    if "head_dims" in parts:
        rows += head_dim_rows()
    with open(path, "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    chosen = sys.argv[sys.argv.index("--part") + 1:] if "--part" in sys.argv else ["ab", "head_dims"]
    main(sys.argv[1], chosen)
