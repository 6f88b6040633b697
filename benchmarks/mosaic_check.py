"""Device check of the Mosaic GPU softmax kernels: correctness against the float32 XLA path on odd shapes, then
timing beside the Triton kernels and cuDNN at the issue's shapes. One call; prints a table, writes JSON to argv[1].

    PYTHONPATH=. python benchmarks/mosaic_check.py $OUT/mosaic.json [--skip-check] [--skip-time]
"""

from __future__ import annotations

import functools
import json
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from complexity_jax.profiling import median_ms
from pallas_kernels import reference
from pallas_kernels._mosaic import softmax as mosaic
from pallas_kernels._triton import softmax as triton
from pallas_kernels.masks import WindowMask


def qkv(b, sq, skv, h, kvh, d, dtype, seed):
    ks = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(ks[0], (b, sq, h, d), dtype), jax.random.normal(ks[1], (b, skv, kvh, d), dtype),
            jax.random.normal(ks[2], (b, skv, kvh, d), dtype), jax.random.normal(ks[3], (b, sq, h, d), jnp.float32))


def make(fwd_backend, bwd_backend, mask, scale, cfgs):
    @jax.custom_vjp
    def f(q, k, v):
        return fwd_backend(q, k, v, mask, scale, cfgs[0])[0]

    def f_fwd(q, k, v):
        out, lse = fwd_backend(q, k, v, mask, scale, cfgs[0])
        return out, (q, k, v, out, lse)

    def f_bwd(res, do):
        return bwd_backend(mask, scale, cfgs[1], res, do)

    f.defvjp(f_fwd, f_bwd)
    return f


def mosaic_fn(mask, scale, cfg=None):
    cfg = cfg or mosaic.MosaicConfig()
    return make(mosaic.forward, mosaic.backward, mask, scale, (cfg, cfg))


def triton_fn(mask, scale, q, k):
    cfg = triton.default_config(q.shape[1], k.shape[1], q.shape[3], q.dtype,
                                unlimited=all(w is None for w in mask.windows))
    return lambda q, k, v: triton.softmax_attention(q, k, v, windows=mask.windows, causal=mask.causal,
                                                    softmax_scale=scale, config=cfg)


def xla_fn(mask, scale):
    def f(q, k, v):
        q_pos, k_pos = reference.causal_positions(q.shape[1], k.shape[1])
        return reference.softmax_attention(q, k, v, mask.visible(q_pos, k_pos)[None], scale)
    return f


def relerr(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.all(np.isfinite(a)):
        return float("nan")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


CHECKS = [
    # name, b, sq, skv, h, kvh, d, dtype, windows-or-None-per-head, causal
    ("causal_d128_gqa4", 1, 1024, 1024, 8, 2, 128, jnp.bfloat16, None, True),
    ("full_d128_gqa2", 1, 512, 512, 4, 2, 128, jnp.bfloat16, None, False),
    ("causal_ragged_d64_fp16", 2, 1999, 1999, 4, 4, 64, jnp.float16, None, True),
    ("window100_ragged", 1, 777, 777, 4, 1, 128, jnp.bfloat16, 100, True),
    ("window300_full_ragged", 1, 555, 555, 4, 2, 64, jnp.bfloat16, 300, False),
    ("multiscale_mixed_gqa2", 1, 1300, 1300, 8, 4, 128, jnp.bfloat16, (32, 64, 200, 1000, None, None, 129, 64), True),
    ("short_queries_window", 1, 100, 777, 4, 2, 128, jnp.bfloat16, 300, True),
    ("causal_d256", 1, 640, 640, 4, 2, 256, jnp.bfloat16, None, True),
]


def run_checks(results):
    for name, b, sq, skv, h, kvh, d, dtype, windows, causal in CHECKS:
        ws = (windows if isinstance(windows, tuple) else (windows,) * h)
        mask, scale = WindowMask(ws, causal), d ** -0.5
        q, k, v, ct = qkv(b, sq, skv, h, kvh, d, dtype, seed=len(results))
        row = {"check": name}
        try:
            f = mosaic_fn(mask, scale, mosaic.default_config(d))
            loss = lambda fn, *a: jnp.sum(fn(*a).astype(jnp.float32) * ct)
            out = jax.jit(f)(q, k, v)
            f32 = [x.astype(jnp.float32) for x in (q, k, v)]
            want = xla_fn(mask, scale)(*f32)
            row["out"] = relerr(out, want)
            grads = jax.jit(jax.grad(functools.partial(loss, f), argnums=(0, 1, 2)))(q, k, v)
            ref = jax.grad(functools.partial(loss, xla_fn(mask, scale)), argnums=(0, 1, 2))(*f32)
            for gname, g, r in zip(("dq", "dk", "dv"), grads, ref):
                row[gname] = relerr(g, r)
            row["ok"] = row["out"] < 1e-2 and all(row[g] < 2e-2 for g in ("dq", "dk", "dv"))
        except Exception as e:  # keep going: one table of everything
            row["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
            traceback.print_exc()
        print(json.dumps(row), flush=True)
        results.append(row)


def flops(seq, h, d, b, windows, causal):
    i = np.arange(seq, dtype=np.int64)
    pairs = 0
    for w in windows:
        w = seq if w is None else w
        pairs += (np.minimum(i + 1, w).sum() if causal else (np.minimum(i + w, seq) - np.maximum(i - w + 1, 0)).sum())
    return 4.0 * b * d * pairs


TIMES = [
    ("causal", 8192, None, True),
    ("full", 8192, None, False),
    ("window1024", 8192, 1024, True),
    ("window1024", 32768, 1024, True),
    ("multiscale", 8192, (256,) * 6 + (512,) * 5 + (1024,) * 5 + (None,) * 16, True),
]


def run_times(results, impls=("mosaic", "triton", "cudnn")):
    b, h, kvh, d = 2, 32, 8, 128
    for name, seq, windows, causal in TIMES:
        ws = windows if isinstance(windows, tuple) else (windows,) * h
        mask, scale = WindowMask(ws, causal), d ** -0.5
        q, k, v, ct = qkv(b, seq, seq, h, kvh, d, jnp.bfloat16, seed=1)
        fl = flops(seq, h, d, b, ws, causal)
        for impl in impls:
            if impl == "mosaic":
                f = mosaic_fn(mask, scale)
            elif impl == "triton":
                f = triton_fn(mask, scale, q, k)
            else:
                if name == "multiscale":
                    continue
                lw = None if windows is None else (windows - 1, 0 if causal else windows - 1)
                f = functools.partial(jax.nn.dot_product_attention, is_causal=causal and windows is None,
                                      local_window_size=lw, implementation="cudnn", scale=scale)
            row = {"case": name, "seq": seq, "impl": impl}
            try:
                fwd = jax.jit(f)
                fb = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * ct), argnums=(0, 1, 2)))
                row["fwd_ms"] = median_ms(fwd, q, k, v, warmup=3, repeats=20)
                row["fwd_bwd_ms"] = median_ms(fb, q, k, v, warmup=3, repeats=20)
                row["fwd_tflops"] = fl / row["fwd_ms"] / 1e9
                row["fwd_bwd_tflops"] = 3.5 * fl / row["fwd_bwd_ms"] / 1e9
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:1500]}"
            print(json.dumps(row), flush=True)
            results.append(row)


if __name__ == "__main__":
    out_path = sys.argv[1]
    results = [{"device": jax.devices()[0].device_kind, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d")}]
    if "--skip-check" not in sys.argv:
        run_checks(results)
    if "--skip-time" not in sys.argv:
        run_times(results)
    with open(out_path, "w") as fh:
        json.dump(results, fh, indent=1)
    print("\nSUMMARY")
    for r in results[1:]:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "error"}
              | ({"error": r["error"][:200]} if "error" in r else {}))
