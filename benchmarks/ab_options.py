"""Interleaved A/B of the soft-cap and sinks options of the Triton softmax kernels beside the plain call and cuDNN,
forward and forward+backward, at the issue-15 shape (causal, S=8192, batch 2, 32 query / 8 KV heads, d128, bf16).

``python benchmarks/ab_options.py OUT.json [--lower-only]``. Variants: plain; ``logits_soft_cap=30`` with the
kernels' default tanh for bf16 (PTX ``tanh.approx.f32``, ``_triton/fast_math.py``); the same with libdevice ``tanhf``
patched in (the question it answered on 2026-12-02: the accurate tanh costs +44% forward+backward, the approximate
one +17%, at the same error);
``sinks``; soft-cap and sinks. Each variant's output and gradients are checked against the float32 XLA path with the
same options first (relerr). Three rounds, the order reversed every other round. ``--lower-only`` lowers every
variant for a GPU and exits (runs on a CPU machine: checks the patch lowers before spending device time).
"""

from __future__ import annotations

import contextlib
import json
import sys

import jax
import jax.numpy as jnp

import pallas_kernels as pk
from complexity_jax.bench import Shape, _grad_fn, cudnn_or_xla, visible_pairs
from complexity_jax.profiling import median_ms
from pallas_kernels._triton import fast_math

SEQ_LEN, CAP = 8192, 30.0


@contextlib.contextmanager
def libdevice_tanh():
    """The kernels with libdevice ``tanhf`` for the soft-cap instead of their default for 16-bit inputs, PTX
    ``tanh.approx.f32`` (``_triton/fast_math.py``); the kernels are retraced (new jit cache keys)."""
    original = fast_math.approximate_tanh_for
    fast_math.approximate_tanh_for = lambda dtype, interpret: False
    jax.clear_caches()  # the kernels' jit caches do not see the patch
    try:
        yield
    finally:
        fast_math.approximate_tanh_for = original
        jax.clear_caches()


def variants(heads: int) -> dict[str, tuple[dict, bool]]:
    """name -> (flash_attention options, whether libdevice's tanh is patched in)."""
    sinks = jnp.linspace(-1.0, 1.0, heads, dtype=jnp.float32)
    return {
        "plain": ({}, False),
        "soft-cap (libdevice tanh)": ({"logits_soft_cap": CAP}, True),
        "soft-cap (tanh.approx)": ({"logits_soft_cap": CAP}, False),
        "sinks": ({"sinks": sinks}, False),
        "soft-cap + sinks": ({"logits_soft_cap": CAP, "sinks": sinks}, False),
    }


def relerr(got, want) -> float:
    got, want = jnp.asarray(got, jnp.float32), jnp.asarray(want, jnp.float32)
    return float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))


def main(out_path: str, lower_only: bool) -> None:
    shape = Shape(2, SEQ_LEN, 32, 8, 128, "bfloat16")
    args = [jax.ShapeDtypeStruct((2, SEQ_LEN, h, 128), jnp.bfloat16) for h in (32, 8, 8)]
    ct_struct = jax.ShapeDtypeStruct((2, SEQ_LEN, 32, 128), jnp.float32)
    flops = 4 * shape.batch * shape.head_dim * visible_pairs(SEQ_LEN, (None,) * shape.num_heads)
    compiled, results = {}, []
    q = k = v = ct = None
    if not lower_only:
        q, k, v = shape.arrays()
        ct = jax.random.normal(jax.random.key(1), q.shape, jnp.float32)
    for name, (options, libdevice) in variants(shape.num_heads).items():
        fn = lambda a, b, c, o=options: pk.flash_attention(a, b, c, implementation="pallas_triton", **o)
        with libdevice_tanh() if libdevice else contextlib.nullcontext():
            if lower_only:
                for f, a in ((fn, args), (_grad_fn(fn), (*args, ct_struct))):
                    text = jax.jit(f).trace(*a).lower(lowering_platforms=("cuda",)).as_text()
                    assert "__gpu$xla.gpu.triton" in text, name
                    assert ("tanh.approx.f32" in text) == ("logits_soft_cap" in options and not libdevice), name
                print(f"{name}: lowers")
                continue
            fwd = jax.jit(fn).lower(q, k, v).compile()
            grad = jax.jit(_grad_fn(fn)).lower(q, k, v, ct).compile()
        xla = lambda a, b, c, o=options: pk.flash_attention(a, b, c, implementation="xla", **o)
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        check = {"fwd": relerr(fwd(q, k, v), jax.jit(xla)(*f32)),
                 "grads": [relerr(g, w) for g, w in zip(grad(q, k, v, ct), jax.jit(_grad_fn(xla))(*f32, ct))]}
        print(f"{name}: relerr vs float32 XLA {check}", flush=True)
        compiled[name, "fwd"] = (fwd, (q, k, v), flops, check)
        compiled[name, "fwd+bwd"] = (grad, (q, k, v, ct), 3.5 * flops, check)
    if lower_only:
        return
    compiled["cudnn", "fwd"] = (jax.jit(cudnn_or_xla("cudnn", None)).lower(q, k, v).compile(), (q, k, v), flops, {})
    compiled["cudnn", "fwd+bwd"] = (jax.jit(_grad_fn(cudnn_or_xla("cudnn", None))).lower(q, k, v, ct).compile(),
                                    (q, k, v, ct), 3.5 * flops, {})
    for r in range(3):
        for key in list(compiled)[:: 1 if r % 2 == 0 else -1]:
            fn, fn_args, f, check = compiled[key]
            ms = median_ms(fn, *fn_args, repeats=20)
            results.append({"round": r, "variant": key[0], "pass": key[1], "ms": ms, "tflops": f / ms / 1e9,
                            "check": check})
            print(f"round {r} {key[0]:<28} {key[1]:<8} {ms:8.3f} ms {f / ms / 1e9:7.1f} TF/s", flush=True)
    meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "shape": shape.__dict__, "cap": CAP}
    with open(out_path, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], "--lower-only" in sys.argv[2:])
