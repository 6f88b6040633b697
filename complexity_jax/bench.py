"""``python -m complexity_jax.bench``: our kernels beside their peers, in one run, one table.

Each case is timed forward and forward+backward (gradients w.r.t. q, k, v) with warm-up runs and the
median of many ``block_until_ready`` runs, and reports ms, TFLOP/s over the *visible* (query, key) pairs
(causal counts the triangle, windows their band; backward counted as 2.5× the forward, the
FlashAttention convention) and the temporary memory of the compiled forward+backward executable.
Peers: ``jax.nn.dot_product_attention`` with cuDNN and with XLA (where the S×S logits fit), JAX's
built-in Pallas ``mha`` (it has no GQA: K/V are repeated inside its timed function), and for the linear
suite flash-linear-attention (``fla-core``, carried to the GPU machine as a wheel).

Suites (all by default, ``--suites`` picks): ``softmax`` (flash causal and a sliding window), ``multiscale``
(against its local and global halves), ``sparse`` (BigBird mask beside our dense causal kernel), ``linear``
(beside fla and our softmax kernel) and ``decode`` (one step against caches: µs, bandwidth vs a copy).

``--quick`` runs tiny shapes (the kernels in interpret mode off-GPU) to check the harness itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from complexity_jax.profiling import format_bytes, median_ms, temp_memory_bytes

ON_GPU = jax.default_backend() == "gpu"
XLA_LOGITS_BUDGET = 24 * 2**30  # skip the XLA peer where its S×S float32 logits would pass this


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    seq_len: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str

    def arrays(self, seed: int = 0):
        keys = jax.random.split(jax.random.key(seed), 3)
        dtype = jnp.dtype(self.dtype)
        q = jax.random.normal(keys[0], (self.batch, self.seq_len, self.num_heads, self.head_dim), dtype)
        k = jax.random.normal(keys[1], (self.batch, self.seq_len, self.num_kv_heads, self.head_dim), dtype)
        v = jax.random.normal(keys[2], (self.batch, self.seq_len, self.num_kv_heads, self.head_dim), dtype)
        return q, k, v


def visible_pairs(seq_len: int, windows: tuple[int | None, ...]) -> int:
    """Causal (query, key) pairs summed over heads: ``sum_i min(i + 1, W_h)``."""
    total = 0
    i = np.arange(seq_len, dtype=np.int64)
    for w in windows:
        total += int(np.minimum(i + 1, seq_len if w is None else w).sum())
    return total


@dataclasses.dataclass
class Result:
    suite: str
    case: str
    impl: str
    seq_len: int
    forward_ms: float | None = None
    forward_backward_ms: float | None = None
    forward_tflops: float | None = None
    forward_backward_tflops: float | None = None
    temp_memory_bytes: int | None = None
    bandwidth_gb_s: float | None = None  # decode: bytes of K/V read per second
    note: str = ""


def _grad_fn(fn: Callable) -> Callable:
    def loss(q, k, v, ct):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * ct)

    return jax.grad(loss, argnums=(0, 1, 2))


def measure(suite: str, case: str, impl: str, fn: Callable, shape: Shape, flops_forward: float,
            repeats: int, backward: bool = True) -> Result:
    q, k, v = shape.arrays()
    result = Result(suite, case, impl, shape.seq_len)
    try:
        fwd = jax.jit(fn)
        result.forward_ms = median_ms(fwd, q, k, v, repeats=repeats)
        result.forward_tflops = flops_forward / result.forward_ms / 1e9
        if backward:
            ct = jax.random.normal(jax.random.key(9), q.shape, jnp.float32)
            grad = _grad_fn(fn)
            result.forward_backward_ms = median_ms(jax.jit(grad), q, k, v, ct, repeats=repeats)
            result.forward_backward_tflops = 3.5 * flops_forward / result.forward_backward_ms / 1e9
            result.temp_memory_bytes = temp_memory_bytes(grad, q, k, v, ct)
    except Exception as e:  # a peer that cannot run this shape is reported, not fatal
        result.note = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
    return result


def ours(interpret: bool, implementation: str = "pallas", **kwargs) -> dict:
    return {"implementation": implementation, "interpret": interpret, **kwargs}


# Our softmax rows: each Pallas backend that can run here (Mosaic GPU needs a Hopper+ GPU).
SOFTMAX_BACKENDS = ("pallas_mosaic", "pallas_triton") if ON_GPU else ("pallas_triton",)


def cudnn_or_xla(implementation: str, window: int | None, causal: bool = True) -> Callable:
    local = None if window is None else (window - 1, 0)
    return lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, local_window_size=local, implementation=implementation
    )


def builtin_pallas_mha(shape: Shape, interpret: bool) -> Callable:
    from jax.experimental.pallas.ops.gpu import attention as jax_attention

    group = shape.num_heads // shape.num_kv_heads
    scale = shape.head_dim ** -0.5

    def fn(q, k, v):
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
        return jax_attention.mha(q, k, v, segment_ids=None, sm_scale=scale, causal=True, interpret=interpret)

    return fn


def softmax_suite(shape: Shape, seq_lens: list[int], window: int, repeats: int, interpret: bool,
                  progress: Callable[[str], None]) -> list[Result]:
    results = []
    h = shape.num_heads
    for s in seq_lens:
        sh = dataclasses.replace(shape, seq_len=s)
        fits_xla = sh.batch * h * s * s * 4 * 3 < XLA_LOGITS_BUDGET
        causal_flops = 4.0 * sh.batch * sh.head_dim * visible_pairs(s, (None,) * h)
        window_flops = 4.0 * sh.batch * sh.head_dim * visible_pairs(s, (window,) * h)
        full_flops = 4.0 * sh.batch * sh.head_dim * h * s * s
        cases = []
        for backend in SOFTMAX_BACKENDS:
            impl = ours(interpret, backend)
            cases += [
                ("flash causal", backend, lambda q, k, v, o=impl: pk.flash_attention(q, k, v, **o), causal_flops),
                ("flash full", backend, lambda q, k, v, o=impl: pk.flash_attention(q, k, v, causal=False, **o),
                 full_flops),
                (f"window {window}", backend,
                 lambda q, k, v, o=impl: pk.flash_attention(q, k, v, window_size=window, **o), window_flops),
            ]
        cases += [
            ("flash causal", "cudnn", cudnn_or_xla("cudnn", None), causal_flops),
            ("flash full", "cudnn", cudnn_or_xla("cudnn", None, causal=False), full_flops),
            ("flash causal", "jax pallas mha", builtin_pallas_mha(sh, interpret), causal_flops),
            (f"window {window}", "cudnn", cudnn_or_xla("cudnn", window), window_flops),
        ]
        if fits_xla:
            cases += [("flash causal", "xla", cudnn_or_xla("xla", None), causal_flops),
                      (f"window {window}", "xla", cudnn_or_xla("xla", window), window_flops)]
        if not ON_GPU:
            cases = [c for c in cases if c[1] != "cudnn"]
        for case, impl, fn, flops in cases:
            progress(f"softmax S={s}: {case} / {impl}")
            results.append(measure("softmax", case, impl, fn, sh, flops, repeats))
    return results


def multiscale_suite(shape: Shape, repeats: int, interpret: bool, progress) -> list[Result]:
    """Multi-scale against its two halves run alone: 16 local heads (256/512/1024) and 16 global heads."""
    h, half = shape.num_heads, shape.num_heads // 2
    windows = tuple((256, 512, 1024)[i * 3 // half] for i in range(half)) + (None,) * half
    s, b, d = shape.seq_len, shape.batch, shape.head_dim
    half_shape = dataclasses.replace(shape, num_heads=half, num_kv_heads=shape.num_kv_heads // 2)
    flops = lambda ws: 4.0 * b * d * visible_pairs(s, ws)
    results = []
    for backend in SOFTMAX_BACKENDS:
        impl = ours(interpret, backend)
        cases = [
            (f"multiscale {half} local + {h - half} global", shape, windows,
             lambda q, k, v: pk.multiscale_attention(q, k, v, windows, **impl)),
            (f"{half} local heads alone", half_shape, windows[:half],
             lambda q, k, v: pk.multiscale_attention(q, k, v, windows[:half], **impl)),
            (f"{h - half} global heads alone", half_shape, windows[half:],
             lambda q, k, v: pk.flash_attention(q, k, v, **impl)),
        ]
        for case, sh, ws, fn in cases:
            progress(f"multiscale S={s}: {case} / {backend}")
            results.append(measure("multiscale", case, backend, fn, sh, flops(ws), repeats))
    return results


def linear_suite(shape: Shape, seq_lens: list[int], repeats: int, interpret: bool, progress) -> list[Result]:
    """Causal elu linear attention (32 heads, no GQA) beside our causal flash kernel and, where importable,
    flash-linear-attention's ``chunk_linear_attn(normalize=True)`` (PyPI ``fla-core``, over torch)."""
    results = []
    h, d, b = shape.num_heads, shape.head_dim, shape.batch
    mha = dataclasses.replace(shape, num_kv_heads=h)
    for s in seq_lens:
        sh = dataclasses.replace(mha, seq_len=s)
        linear_flops = 4.0 * b * h * s * d * d  # phi(k) v^T state updates and phi(q) S reads, per token
        causal_flops = 4.0 * b * d * visible_pairs(s, (None,) * h)
        progress(f"linear S={s}: ours")
        results.append(measure("linear", "causal elu", "ours", lambda q, k, v: pk.linear_attention(
            q, k, v, "elu", True, **ours(interpret))[0], sh, linear_flops, repeats))
        progress(f"linear S={s}: fla")
        results.append(fla_linear(sh, linear_flops, repeats))
        progress(f"linear S={s}: our flash causal")
        results.append(measure("linear", "flash causal (softmax)", "ours", lambda q, k, v: pk.flash_attention(
            q, k, v, **ours(interpret)), sh, causal_flops, max(2, repeats // 4)))
    return results


def fla_linear(shape: Shape, flops_forward: float, repeats: int) -> Result:
    """flash-linear-attention's chunked kernel on the same shapes, elu+1 applied in torch, timed by triton."""
    result = Result("linear", "causal elu", "fla chunk_linear_attn", shape.seq_len)
    try:
        import torch
        import triton
        from fla.ops.linear_attn import chunk_linear_attn
    except ImportError as e:
        result.note = f"fla not importable: {e}"
        return result
    try:
        dtype = getattr(torch, shape.dtype)
        make = lambda: torch.randn(shape.batch, shape.seq_len, shape.num_heads, shape.head_dim, device="cuda",
                                   dtype=dtype, requires_grad=True)
        q, k, v = make(), make(), make()
        phi = lambda x: torch.nn.functional.elu(x) + 1
        fwd = lambda: chunk_linear_attn(phi(q), phi(k), v, scale=1.0, normalize=True)[0]
        do = torch.randn_like(q)

        def fwd_bwd():
            fwd().backward(do)

        result.forward_ms = triton.testing.do_bench(fwd, rep=repeats * 20, return_mode="median")
        result.forward_backward_ms = triton.testing.do_bench(fwd_bwd, rep=repeats * 20, return_mode="median",
                                                             grad_to_none=[q, k, v])
        result.forward_tflops = flops_forward / result.forward_ms / 1e9
        result.forward_backward_tflops = 3.5 * flops_forward / result.forward_backward_ms / 1e9
        result.note = "torch peak memory n/a"
    except Exception as e:  # report, don't abort the run
        result.note = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
    return result


def sparse_visible_pairs(mask: pk.SparseMask, seq_len: int) -> int:
    """Visible (query, key) pairs of a causal ``mask`` summed over heads, counted per row from the mask rules."""
    if not mask.causal:
        raise ValueError("sparse_visible_pairs counts causal masks only")
    bs, n_global, n_local = mask.block_size, mask.num_global_tokens, mask.num_local_blocks
    i = np.arange(seq_len, dtype=np.int64)
    bi = i // bs
    band_lo = np.maximum(bi - n_local + 1, 0) * bs
    per_row = i - band_lo + 1 + np.minimum(n_global, band_lo)  # band, then global columns left of it
    random = mask.random_blocks(-(-seq_len // bs)).astype(np.int64)[:, bi]  # [heads, S, r]; all left of the band
    start = random * bs
    # Each random block adds its keys not already counted as global columns; -1 marks an unused slot.
    extra = np.where(random >= 0, bs - np.clip(n_global - start, 0, bs), 0).sum(axis=-1)
    total = per_row[None] + extra
    return int(np.where(i < n_global, i + 1, total).sum())


def sparse_suite(shape: Shape, seq_lens: list[int], repeats: int, interpret: bool, progress) -> list[Result]:
    """Causal BigBird mask (block 64, 1 global token, 3 local, 3 random blocks) beside our dense causal kernel;
    TFLOP/s count only the visible pairs of each."""
    results = []
    b, d, h = shape.batch, shape.head_dim, shape.num_heads
    for s in seq_lens:
        sh = dataclasses.replace(shape, seq_len=s)
        mask = pk.SparseMask(h, block_size=min(64, s), num_global_tokens=1, num_local_blocks=3, num_random_blocks=3)
        sparse_flops = 4.0 * b * d * sparse_visible_pairs(mask, s)
        causal_flops = 4.0 * b * d * visible_pairs(s, (None,) * h)
        kwargs = dict(block_size=mask.block_size, num_global_tokens=1, num_local_blocks=3, num_random_blocks=3)
        progress(f"sparse S={s}: block-sparse")
        results.append(measure("sparse", "bigbird 64/1g/3l/3r", "ours", lambda q, k, v: pk.sparse_attention(
            q, k, v, **kwargs, **ours(interpret)), sh, sparse_flops, repeats))
        progress(f"sparse S={s}: dense causal")
        results.append(measure("sparse", "dense flash causal", "ours", lambda q, k, v: pk.flash_attention(
            q, k, v, **ours(interpret)), sh, causal_flops, max(2, repeats // 4)))
    return results


def copy_bandwidth(num_bytes: int, repeats: int) -> float:
    """Bytes per second of an on-device float32 elementwise pass (reads and writes ``num_bytes`` each)."""
    x = jnp.ones((num_bytes // 4,), jnp.float32)
    ms = median_ms(jax.jit(lambda x: x + 1), x, repeats=repeats, calls=5)
    return 2 * num_bytes / (ms * 1e-3)


def decode_suite(shape: Shape, contexts: list[int], batch: int, window: int, repeats: int, interpret: bool,
                 progress) -> tuple[list[Result], float]:
    """One decode step (one query per row, full caches of ``context`` slots) and a windowed step; the peers get
    ``key_value_seq_lengths``. Returns the results and the copy bandwidth (bytes/s) measured on the largest cache."""
    from jax.experimental.pallas.ops.gpu import decode_attention as jax_decode

    h, kvh, d, dtype = shape.num_heads, shape.num_kv_heads, shape.head_dim, jnp.dtype(shape.dtype)
    kv_bytes = lambda ctx: 2 * batch * ctx * kvh * d * dtype.itemsize
    progress("decode: copy bandwidth")
    bandwidth = copy_bandwidth(kv_bytes(max(contexts)), repeats)
    results = []
    for ctx in contexts:
        keys = jax.random.split(jax.random.key(ctx), 3)
        q = jax.random.normal(keys[0], (batch, 1, h, d), dtype)
        k = jax.random.normal(keys[1], (batch, ctx, kvh, d), dtype)
        v = jax.random.normal(keys[2], (batch, ctx, kvh, d), dtype)
        lengths = jnp.full((batch,), ctx, jnp.int32)
        cases = [
            ("full context", "ours", kv_bytes(ctx), lambda q, k, v, n: pk.decode_attention(q, k, v, n, **ours(interpret))),
            (f"window {window}", "ours", kv_bytes(min(window, ctx)), lambda q, k, v, n: pk.decode_attention(
                q, k, v, n, window_size=window, **ours(interpret))),
            ("full context", "jax pallas gqa", kv_bytes(ctx), lambda q, k, v, n: jax_decode.gqa(
                q[:, 0], k, v, kv_seq_len=n, interpret=interpret)),
        ]
        for impl in (["cudnn", "xla"] if ON_GPU else ["xla"]):
            cases.append(("full context", impl, kv_bytes(ctx), functools.partial(_sdpa_decode, implementation=impl)))
        for case, impl, num_bytes, fn in cases:
            progress(f"decode context={ctx}: {case} / {impl}")
            result = Result("decode", case, impl, ctx)
            try:
                result.forward_ms = median_ms(jax.jit(fn), q, k, v, lengths, repeats=repeats, calls=20)
                result.bandwidth_gb_s = num_bytes / result.forward_ms / 1e6
                result.note = (f"{result.forward_ms * 1e3:.0f} us, {result.bandwidth_gb_s:.0f} GB/s"
                               f" = {result.bandwidth_gb_s * 1e9 / bandwidth:.0%} of copy")
            except Exception as e:  # a peer that cannot run this shape is reported, not fatal
                result.note = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
            results.append(result)
    return results, bandwidth


def _sdpa_decode(q, k, v, lengths, *, implementation: str):
    return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation=implementation)


def print_table(results: list[Result]) -> None:
    header = (f"{'suite':<10} {'case':<32} {'impl':<15} {'S':>6} {'fwd ms':>8} {'TF/s':>6} "
              f"{'f+b ms':>8} {'TF/s':>6} {'f+b temp':>10}  note")
    print(header)
    print("-" * len(header))
    fmt = lambda x, spec: format(x, spec) if x is not None else "-"
    for r in results:
        print(f"{r.suite:<10} {r.case:<32} {r.impl:<15} {r.seq_len:>6} {fmt(r.forward_ms, '8.3f'):>8} "
              f"{fmt(r.forward_tflops, '6.1f'):>6} {fmt(r.forward_backward_ms, '8.3f'):>8} "
              f"{fmt(r.forward_backward_tflops, '6.1f'):>6} {format_bytes(r.temp_memory_bytes):>10}  {r.note}")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m complexity_jax.bench", description=__doc__)
    suites = ["softmax", "multiscale", "sparse", "linear", "decode"]
    p.add_argument("--suites", nargs="+", default=suites, choices=suites, help="default: all of them")
    p.add_argument("--quick", action="store_true", help="tiny shapes; kernels in interpret mode off-GPU")
    p.add_argument("--seq-lens", type=int, nargs="+", default=None)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--json", default="bench_results.json", help="where to write the raw results")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    interpret = not ON_GPU
    if args.quick:
        shape = Shape(batch=1, seq_len=128, num_heads=4, num_kv_heads=2, head_dim=32, dtype="float32")
        seq_lens, window, repeats = args.seq_lens or [128], min(args.window, 32), args.repeats or 2
    else:
        shape = Shape(batch=2, seq_len=8192, num_heads=32, num_kv_heads=8, head_dim=128, dtype="bfloat16")
        seq_lens, window, repeats = args.seq_lens or [8192, 32768], args.window, args.repeats or 20
    progress = lambda msg: print(f"... {msg}", file=sys.stderr, flush=True)
    device = jax.devices()[0]
    meta = {"device": device.device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
            "shape": dataclasses.asdict(shape), "window": window, "repeats": repeats}
    print(f"device {meta['device']}, jax {meta['jax']}, batch {shape.batch}, heads {shape.num_heads}/"
          f"{shape.num_kv_heads}, head_dim {shape.head_dim}, {shape.dtype}", flush=True)
    results: list[Result] = []
    if "softmax" in args.suites:
        results += softmax_suite(shape, seq_lens, window, repeats, interpret, progress)
    if "multiscale" in args.suites:
        ms_shape = dataclasses.replace(shape, seq_len=seq_lens[0])
        results += multiscale_suite(ms_shape, repeats, interpret, progress)
    if "linear" in args.suites:
        linear_lens = args.seq_lens or ([128] if args.quick else [8192, 32768, 131072])
        results += linear_suite(shape, linear_lens, repeats, interpret, progress)
    if "sparse" in args.suites:
        sparse_lens = args.seq_lens or ([256] if args.quick else [4096, 16384, 65536])
        results += sparse_suite(shape, sparse_lens, repeats, interpret, progress)
    if "decode" in args.suites:
        contexts = args.seq_lens or ([256] if args.quick else [4096, 32768, 131072])
        decode_results, bandwidth = decode_suite(shape, contexts, 2 if args.quick else 8, window, repeats,
                                                 interpret, progress)
        results += decode_results
        meta["copy_bandwidth_gb_s"] = bandwidth / 1e9
        print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s (elementwise pass over the largest K+V cache)")
    print_table(results)
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "results": [dataclasses.asdict(r) for r in results]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
