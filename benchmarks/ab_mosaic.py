"""A/B of MosaicConfig variants (interleaved, same process) on one shape: forward and forward+backward ms.

    PYTHONPATH=. python benchmarks/ab_mosaic.py OUT.json
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp

import pallas_kernels as pk
from complexity_jax.profiling import median_ms
from pallas_kernels._mosaic.softmax import MosaicConfig

VARIANTS = {
    "default": MosaicConfig(),
    "stages_bwd3": MosaicConfig(stages_bwd=3),
    "stages3": MosaicConfig(stages=3),
}
CASES = {"full": dict(causal=False), "causal": dict(causal=True)}


def main(path):
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (2, 8192, 32, 128), jnp.bfloat16)
    k, v = (jax.random.normal(x, (2, 8192, 8, 128), jnp.bfloat16) for x in keys[1:3])
    ct = jax.random.normal(keys[3], q.shape, jnp.float32)
    rows = []
    for case, kw in CASES.items():
        fns = {}
        for name, cfg in VARIANTS.items():
            f = lambda q, k, v, cfg=cfg: pk.flash_attention(q, k, v, implementation="pallas_mosaic", kernel_config=cfg,
                                                            **kw)
            fns[name] = (jax.jit(f), jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a).astype(jnp.float32) * ct),
                                                      argnums=(0, 1, 2))))
        for rnd in range(2):  # interleaved rounds: the spread between rounds is the noise
            for name, (fwd, fb) in fns.items():
                row = dict(case=case, variant=name, round=rnd, fwd_ms=median_ms(fwd, q, k, v, repeats=10),
                           fwd_bwd_ms=median_ms(fb, q, k, v, repeats=10))
                print(json.dumps(row), flush=True)
                rows.append(row)
    json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows}, open(path, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
