"""python -m complexity_jax.bench: our kernels beside their peers, in one run, one table.

Each row times one attention call forward, and forward+backward (gradients of q, k and v): a few warm-up runs,
then the median of many samples (on a GPU each sample is 5 runs dispatched back to back, so the host's sync is not
counted: the GPU's time, as the torch peers' CUDA-event timing measures). It reports milliseconds, TFLOP/s over the
(query, key) pairs the mask lets through (causal counts the triangle, a window its band; the backward counts as 2.5
forwards, as FlashAttention does) and the scratch memory of the compiled forward+backward.

Peers: cuDNN and XLA through jax.nn.dot_product_attention (XLA only where the S x S scores fit in memory),
the Pallas mha kernel that ships with JAX (it has no GQA, so K/V are repeated inside its timed call) and, for
linear attention, flash-linear-attention (pip install fla-core, with PyTorch; its row says so when missing).

Suites: softmax (causal, full and sliding-window attention), multiscale (beside its local and global heads run
alone), sparse (a BigBird mask beside dense causal attention), linear (beside fla and causal softmax attention),
decode (one new token against a cache: time and memory bandwidth, beside a plain copy), packed (rows packing
documents, beside the documents run alone, dense causal attention and FlexAttention's document mask; a half-padded
batch) and options (the cost of a logit soft-cap and of sinks on causal attention).

Off a GPU the kernels run in Pallas interpret mode (an emulator: slow, and its times mean nothing); use
--quick there to check that everything runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import pathlib
import re
import sys
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import pallas_kernels as pk
from complexity_jax.profiling import format_bytes, format_table, median_ms, temp_memory_bytes

ON_GPU = jax.default_backend() == "gpu"
XLA_LOGITS_BUDGET = 24 * 2**30  # skip the XLA peer where its S×S float32 logits would pass this
SUITES = ("softmax", "multiscale", "sparse", "linear", "decode", "packed", "options")
JSON_FOLDER = pathlib.Path("bench_out")  # git-ignored


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


# Runs dispatched back to back per timing sample on a GPU: the final sync's host round trip (0.1-0.3 ms on the H200)
# is spread over them, so a row measures the GPU's time as triton's ``do_bench`` (CUDA events) does for the torch
# peers. One run per sample on CPU, where interpret mode is slow and the times only check that the bench runs.
CALLS_PER_SAMPLE = 5 if ON_GPU else 1


def measure(suite: str, case: str, impl: str, fn: Callable, shape: Shape, flops_forward: float,
            repeats: int, backward: bool = True) -> Result:
    q, k, v = shape.arrays()
    result = Result(suite, case, impl, shape.seq_len)
    try:
        fwd = jax.jit(fn)
        result.forward_ms = median_ms(fwd, q, k, v, repeats=repeats, calls=CALLS_PER_SAMPLE)
        result.forward_tflops = flops_forward / result.forward_ms / 1e9
        if backward:
            ct = jax.random.normal(jax.random.key(9), q.shape, jnp.float32)
            grad = _grad_fn(fn)
            result.forward_backward_ms = median_ms(jax.jit(grad), q, k, v, ct, repeats=repeats,
                                                   calls=CALLS_PER_SAMPLE)
            result.forward_backward_tflops = 3.5 * flops_forward / result.forward_backward_ms / 1e9
            result.temp_memory_bytes = temp_memory_bytes(grad, q, k, v, ct)
    except Exception as e:  # a peer that cannot run this shape is reported, not fatal
        result.note = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
    return result


@dataclasses.dataclass(frozen=True)
class Case:
    """One planned row: its labels, and the call that measures it (so a run knows its length before it starts)."""

    suite: str
    case: str
    impl: str
    seq_len: int
    run: Callable[[], Result]

    @property
    def description(self) -> str:
        return f"{self.suite} S={self.seq_len}: {self.case} / {self.impl}"


def timed(suite: str, case: str, impl: str, fn: Callable, shape: Shape, flops_forward: float, repeats: int) -> Case:
    """The ``Case`` that ``measure``s ``fn`` on ``shape``."""
    return Case(suite, case, impl, shape.seq_len,
                functools.partial(measure, suite, case, impl, fn, shape, flops_forward, repeats))


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


def softmax_suite(shape: Shape, seq_lens: list[int], window: int, repeats: int, interpret: bool) -> list[Case]:
    """Causal, full and sliding-window attention: each of our Pallas backends beside cuDNN, XLA and JAX's ``mha``."""
    planned = []
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
        if ON_GPU:
            cases += [
                ("flash causal", "cudnn", cudnn_or_xla("cudnn", None), causal_flops),
                ("flash full", "cudnn", cudnn_or_xla("cudnn", None, causal=False), full_flops),
                (f"window {window}", "cudnn", cudnn_or_xla("cudnn", window), window_flops),
            ]
        cases.append(("flash causal", "jax pallas mha", builtin_pallas_mha(sh, interpret), causal_flops))
        if fits_xla:
            cases += [("flash causal", "xla", cudnn_or_xla("xla", None), causal_flops),
                      (f"window {window}", "xla", cudnn_or_xla("xla", window), window_flops)]
        planned += [timed("softmax", case, impl, fn, sh, flops, repeats) for case, impl, fn, flops in cases]
    return planned


def multiscale_windows(window: int, num_local_heads: int) -> tuple[int, ...]:
    """The local heads' windows: ``window / 4``, ``/ 2`` and ``window`` itself, split evenly over the local heads."""
    sizes = (window // 4, window // 2, window)
    return tuple(sizes[i * len(sizes) // num_local_heads] for i in range(num_local_heads))


def multiscale_suite(shape: Shape, window: int, repeats: int, interpret: bool) -> list[Case]:
    """Multi-scale (half the heads local, with the windows of ``multiscale_windows``, half global) beside its two
    halves run alone."""
    h, half = shape.num_heads, shape.num_heads // 2
    windows = multiscale_windows(window, half) + (None,) * (h - half)
    local = "/".join(str(w) for w in sorted(set(windows[:half])))
    s, b, d = shape.seq_len, shape.batch, shape.head_dim
    half_shape = dataclasses.replace(shape, num_heads=half, num_kv_heads=max(1, shape.num_kv_heads // 2))
    flops = lambda ws: 4.0 * b * d * visible_pairs(s, ws)
    planned = []
    for backend in SOFTMAX_BACKENDS:
        impl = ours(interpret, backend)
        cases = [
            (f"multiscale {half} local ({local}) + {h - half} global", shape, windows,
             lambda q, k, v, o=impl: pk.multiscale_attention(q, k, v, windows, **o)),
            (f"{half} local heads ({local}) alone", half_shape, windows[:half],
             lambda q, k, v, o=impl: pk.multiscale_attention(q, k, v, windows[:half], **o)),
            (f"{h - half} global heads alone", half_shape, windows[half:],
             lambda q, k, v, o=impl: pk.flash_attention(q, k, v, **o)),
        ]
        planned += [timed("multiscale", case, backend, fn, sh, flops(ws), repeats) for case, sh, ws, fn in cases]
    return planned


def linear_suite(shape: Shape, seq_lens: list[int], repeats: int, interpret: bool) -> list[Case]:
    """Causal elu linear attention (as many KV heads as query heads) beside our causal flash kernel and, where
    importable, flash-linear-attention's ``chunk_linear_attn(normalize=True)`` (PyPI ``fla-core``, over torch)."""
    planned = []
    h, d, b = shape.num_heads, shape.head_dim, shape.batch
    mha = dataclasses.replace(shape, num_kv_heads=h)
    for s in seq_lens:
        sh = dataclasses.replace(mha, seq_len=s)
        linear_flops = 4.0 * b * h * s * d * d  # phi(k) v^T state updates and phi(q) S reads, per token
        causal_flops = 4.0 * b * d * visible_pairs(s, (None,) * h)
        planned += [
            timed("linear", "causal elu", "ours", lambda q, k, v: pk.linear_attention(
                q, k, v, "elu", True, **ours(interpret))[0], sh, linear_flops, repeats),
            Case("linear", "causal elu", FLA, s, functools.partial(fla_linear, sh, linear_flops, repeats)),
            timed("linear", "flash causal (softmax)", "ours", lambda q, k, v: pk.flash_attention(
                q, k, v, **ours(interpret)), sh, causal_flops, max(2, repeats // 4)),
        ]
    return planned


FLA = "fla chunk_linear_attn"


def fla_linear(shape: Shape, flops_forward: float, repeats: int) -> Result:
    """flash-linear-attention's chunked kernel on the same shapes, elu+1 applied in torch, timed by triton."""
    result = Result("linear", "causal elu", FLA, shape.seq_len)
    try:
        import torch
        from fla.ops.linear_attn import chunk_linear_attn
    except ImportError as e:
        result.note = f"not run: fla not importable ({e}); pip install fla-core on a GPU machine"
        return result
    try:
        dtype = getattr(torch, shape.dtype)
        make = lambda: torch.randn(shape.batch, shape.seq_len, shape.num_heads, shape.head_dim, device="cuda",
                                   dtype=dtype, requires_grad=True)
        q, k, v = make(), make(), make()
        phi = lambda x: torch.nn.functional.elu(x) + 1
        fwd = lambda: chunk_linear_attn(phi(q), phi(k), v, scale=1.0, normalize=True)[0]
        time_torch(result, fwd, (q, k, v), flops_forward, repeats)
    except Exception as e:  # report, don't abort the run
        result.note = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
    return result


def time_torch(result: Result, fwd: Callable, inputs: tuple, flops_forward: float, repeats: int) -> None:
    """Fills ``result`` with the median times (triton's ``do_bench``) of a torch peer's ``fwd()`` and of its forward
    and backward to ``inputs``, and the TFLOP/s they give."""
    import torch
    import triton

    do = torch.randn_like(inputs[0])

    def fwd_bwd():
        fwd().backward(do)

    result.forward_ms = triton.testing.do_bench(fwd, rep=repeats * 20, return_mode="median")
    result.forward_backward_ms = triton.testing.do_bench(fwd_bwd, rep=repeats * 20, return_mode="median",
                                                         grad_to_none=list(inputs))
    result.forward_tflops = flops_forward / result.forward_ms / 1e9
    result.forward_backward_tflops = 3.5 * flops_forward / result.forward_backward_ms / 1e9
    result.note = "torch peak memory n/a"


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


def sparse_suite(shape: Shape, seq_lens: list[int], repeats: int, interpret: bool) -> list[Case]:
    """Causal BigBird mask (block 64, 1 global token, 3 local, 3 random blocks) beside our dense causal kernel;
    TFLOP/s count only the visible pairs of each."""
    planned = []
    b, d, h = shape.batch, shape.head_dim, shape.num_heads
    for s in seq_lens:
        sh = dataclasses.replace(shape, seq_len=s)
        mask = pk.SparseMask(h, block_size=min(64, s), num_global_tokens=1, num_local_blocks=3, num_random_blocks=3)
        label = (f"bigbird block {mask.block_size}, {mask.num_global_tokens} global, {mask.num_local_blocks} local,"
                 f" {mask.num_random_blocks} random")
        kwargs = {field: getattr(mask, field) for field in
                  ("block_size", "num_global_tokens", "num_local_blocks", "num_random_blocks")}
        planned += [
            timed("sparse", label, "ours", lambda q, k, v, kw=kwargs: pk.sparse_attention(
                q, k, v, **kw, **ours(interpret)), sh, 4.0 * b * d * sparse_visible_pairs(mask, s), repeats),
            timed("sparse", "dense flash causal", "ours", lambda q, k, v: pk.flash_attention(
                q, k, v, **ours(interpret)), sh, 4.0 * b * d * visible_pairs(s, (None,) * h), max(2, repeats // 4)),
        ]
    return planned


def packed_documents(seq_len: int, batch: int, seed: int = 0) -> list[list[int]]:
    """Document lengths of each row: drawn from ``seq_len / 16, / 8, / 4, / 2`` (512 to 4096 at 8192) until the row
    is full, the last one cut to fit."""
    rng = np.random.default_rng(seed)
    choices = [max(1, seq_len // n) for n in (16, 8, 4, 2)]
    rows = []
    for _ in range(batch):
        row = []
        while sum(row) < seq_len:
            row.append(min(int(rng.choice(choices)), seq_len - sum(row)))
        rows.append(row)
    return rows


def causal_documents_flops(shape: Shape, docs: list[list[int]]) -> float:
    """Forward FLOPs of the pairs inside causal documents (``docs``: each row's document lengths), all heads."""
    return 4.0 * shape.head_dim * shape.num_heads * sum(n * (n + 1) / 2 for row in docs for n in row)


def packed_suite(shape: Shape, seq_lens: list[int], repeats: int, interpret: bool) -> list[Case]:
    """Causal attention over rows that pack documents (``packed_documents``) with segment ids, beside the same
    documents run alone one after another and the dense causal kernel over the packed length, for each Pallas backend
    that runs here, and, on a GPU, FlexAttention's document mask; and two padded batches beside the full one: the
    second row half padding, and every row half padding (issue 14's "a batch whose rows are half padding"). TFLOP/s count
    the pairs inside documents (padding: the valid prefixes) for every row, so they compare useful work."""
    planned = []
    b, d, h = shape.batch, shape.head_dim, shape.num_heads
    for s in seq_lens:
        sh = dataclasses.replace(shape, seq_len=s)
        docs = packed_documents(s, b)
        ids = jnp.asarray(np.stack([np.repeat(np.arange(len(row)), row) for row in docs]), jnp.int32)
        doc_flops = causal_documents_flops(shape, docs)
        label = f"packed docs of {min(min(r) for r in docs)}-{max(max(r) for r in docs)} ({sum(map(len, docs))} docs)"
        padded = [n for n in ([s] + [s // 2] * (b - 1), [s // 2] * b) if min(n) < s]  # valid lengths per row
        for backend in SOFTMAX_BACKENDS:
            impl = ours(interpret, backend)
            planned += [
                timed("packed", label, f"{backend} segment ids",
                      lambda q, k, v, ids=ids, impl=impl: pk.flash_attention(q, k, v, q_segment_ids=ids, **impl), sh,
                      doc_flops, repeats),
                timed("packed", label, f"{backend} each doc alone",
                      lambda q, k, v, docs=docs, impl=impl: _documents_alone(q, k, v, docs, impl), sh, doc_flops,
                      repeats),
                timed("packed", label, f"{backend} dense causal",
                      lambda q, k, v, impl=impl: pk.flash_attention(q, k, v, **impl), sh, doc_flops, repeats),
                *(timed("packed", f"padded rows ({', '.join(map(str, n))})", f"{backend} lengths",
                        lambda q, k, v, n=jnp.asarray(n, jnp.int32), impl=impl: pk.flash_attention(
                            q, k, v, query_seq_lengths=n, key_value_seq_lengths=n, **impl), sh,
                        causal_documents_flops(shape, [[x] for x in n]), repeats) for n in padded),
                timed("packed", f"full rows ({s})", backend,
                      lambda q, k, v, impl=impl: pk.flash_attention(q, k, v, **impl), sh,
                      4.0 * b * d * visible_pairs(s, (None,) * h), repeats),
            ]
        planned.append(
            Case("packed", label, FLEX, s, functools.partial(flex_documents, label, sh, docs, doc_flops, repeats)))
    return planned


def _documents_alone(q, k, v, docs: list[list[int]], impl: dict):
    """Each document of each row through its own causal call, outputs written back in place."""
    out = jnp.zeros_like(q)
    for row, lengths in enumerate(docs):
        start = 0
        for n in lengths:
            part = lambda x: x[row:row + 1, start:start + n]
            out = out.at[row:row + 1, start:start + n].set(pk.flash_attention(part(q), part(k), part(v), **impl))
            start += n
    return out


FLEX = "torch flex_attention"


def flex_documents(case: str, shape: Shape, docs: list[list[int]], flops_forward: float, repeats: int) -> Result:
    """FlexAttention (torch.compile'd) with a causal document mask (``create_block_mask``), GQA without repeating
    K/V, timed by triton."""
    result = Result("packed", case, FLEX, shape.seq_len)
    try:
        import torch
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        result.note = f"not run: torch FlexAttention not importable ({e})"
        return result
    try:
        b, s, h, kvh, d = shape.batch, shape.seq_len, shape.num_heads, shape.num_kv_heads, shape.head_dim
        doc = torch.tensor(np.stack([np.repeat(np.arange(len(row)), row) for row in docs]), device="cuda")

        def document_causal(batch, head, q_idx, kv_idx):
            return (doc[batch, q_idx] == doc[batch, kv_idx]) & (q_idx >= kv_idx)

        block_mask = create_block_mask(document_causal, B=b, H=None, Q_LEN=s, KV_LEN=s, device="cuda")
        flex = torch.compile(flex_attention)
        dtype = getattr(torch, shape.dtype)
        make = lambda heads: torch.randn(b, heads, s, d, device="cuda", dtype=dtype, requires_grad=True)
        q, k, v = make(h), make(kvh), make(kvh)
        fwd = lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True)
        time_torch(result, fwd, (q, k, v), flops_forward, repeats)
    except Exception as e:  # report, don't abort the run
        result.note = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
    return result


def options_suite(shape: Shape, seq_lens: list[int], repeats: int, interpret: bool) -> list[Case]:
    """Causal attention with a logit soft-cap, with sinks and with both, beside the plain call of the same backend
    (Triton: the backend that serves these options) and, on a GPU, the plain Mosaic call."""
    planned = []
    b, d, h = shape.batch, shape.head_dim, shape.num_heads
    sinks = jnp.linspace(-1.0, 1.0, h, dtype=jnp.float32)
    for s in seq_lens:
        sh = dataclasses.replace(shape, seq_len=s)
        flops = 4.0 * b * d * visible_pairs(s, (None,) * h)
        variants = [("plain", {}), ("soft-cap 30", {"logits_soft_cap": 30.0}), ("sinks", {"sinks": sinks}),
                    ("soft-cap 30 + sinks", {"logits_soft_cap": 30.0, "sinks": sinks})]
        for case, extra in variants:
            impl = ours(interpret, "pallas_triton", **extra)
            planned.append(timed("options", f"flash causal, {case}", "pallas_triton",
                                 lambda q, k, v, o=impl: pk.flash_attention(q, k, v, **o), sh, flops, repeats))
        if "pallas_mosaic" in SOFTMAX_BACKENDS:
            planned.append(timed("options", "flash causal, plain", "pallas_mosaic", lambda q, k, v: pk.flash_attention(
                q, k, v, **ours(interpret, "pallas_mosaic")), sh, flops, repeats))
    return planned


def copy_bandwidth(num_bytes: int, repeats: int) -> float:
    """Bytes per second of an on-device float32 elementwise pass (reads and writes ``num_bytes`` each)."""
    x = jnp.ones((num_bytes // 4,), jnp.float32)
    ms = median_ms(jax.jit(lambda x: x + 1), x, repeats=repeats, calls=5)
    return 2 * num_bytes / (ms * 1e-3)


def decode_suite(shape: Shape, contexts: list[int], batch: int, window: int, repeats: int, interpret: bool
                 ) -> list[Case]:
    """One decode step (one query per row, full caches of ``context`` slots), a windowed step and a ragged step (row
    lengths spread evenly from ``context / 8`` to ``context``: its bandwidth counts the slots it reads, to compare
    with the full step's); the peers get ``key_value_seq_lengths``. Notes give the bandwidth as a share of a copy's,
    measured on the largest cache."""
    h, kvh, d, dtype = shape.num_heads, shape.num_kv_heads, shape.head_dim, jnp.dtype(shape.dtype)
    kv_bytes = lambda ctx: 2 * batch * ctx * kvh * d * dtype.itemsize
    largest = max(contexts)
    copy = functools.cache(lambda: copy_bandwidth(kv_bytes(largest), repeats))
    planned = [Case("decode", COPY_CASE, "xla", largest, functools.partial(measure_copy, largest, copy))]
    for ctx in contexts:
        cases = [
            (f"full context, batch {batch}", "ours", kv_bytes(ctx),
             lambda q, k, v, n: pk.decode_attention(q, k, v, n, **ours(interpret))),
            (f"window {window}, batch {batch}", "ours", kv_bytes(min(window, ctx)),
             lambda q, k, v, n: pk.decode_attention(q, k, v, n, window_size=window, **ours(interpret))),
            (f"full context, batch {batch}", "jax pallas gqa", kv_bytes(ctx),
             functools.partial(_builtin_pallas_decode, interpret=interpret)),
        ]
        for impl in (["cudnn", "xla"] if ON_GPU else ["xla"]):
            cases.append((f"full context, batch {batch}", impl, kv_bytes(ctx),
                          functools.partial(_sdpa_decode, implementation=impl)))
        planned += [Case("decode", case, impl, ctx, functools.partial(
            measure_decode, case, impl, fn, batch, ctx, shape, num_bytes, copy, repeats))
            for case, impl, num_bytes, fn in cases]
        ragged = tuple(np.linspace(max(1, ctx // 8), ctx, batch).astype(int).tolist())
        case = f"ragged {ragged[0]}..{ragged[-1]}, batch {batch}"
        planned.append(Case("decode", case, "ours", ctx, functools.partial(
            measure_decode, case, "ours", lambda q, k, v, n: pk.decode_attention(q, k, v, n, **ours(interpret)),
            batch, ctx, shape, kv_bytes(ctx) * sum(ragged) // (batch * ctx), copy, repeats, ragged)))
    return planned


COPY_CASE = "copy of the largest K+V cache"


def measure_copy(context: int, copy_bandwidth: Callable[[], float]) -> Result:
    """The row of the copy that the decode rows' bandwidth is compared with."""
    bandwidth = copy_bandwidth()
    return Result("decode", COPY_CASE, "xla", context, bandwidth_gb_s=bandwidth / 1e9,
                  note=f"{bandwidth / 1e9:.0f} GB/s: an elementwise pass (reads and writes), the bar for decode")


def measure_decode(case: str, impl: str, fn: Callable, batch: int, context: int, shape: Shape, num_bytes: int,
                   copy_bandwidth: Callable[[], float], repeats: int, lengths: tuple[int, ...] | None = None) -> Result:
    """Times one decode step of ``fn(q, k, v, lengths)`` against caches of ``context`` slots, filled to ``lengths``
    (default: full)."""
    h, kvh, d, dtype = shape.num_heads, shape.num_kv_heads, shape.head_dim, jnp.dtype(shape.dtype)
    keys = jax.random.split(jax.random.key(context), 3)
    q = jax.random.normal(keys[0], (batch, 1, h, d), dtype)
    k = jax.random.normal(keys[1], (batch, context, kvh, d), dtype)
    v = jax.random.normal(keys[2], (batch, context, kvh, d), dtype)
    lengths = jnp.full((batch,), context, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
    result = Result("decode", case, impl, context)
    try:
        result.forward_ms = median_ms(jax.jit(fn), q, k, v, lengths, repeats=repeats, calls=20)
        result.bandwidth_gb_s = num_bytes / result.forward_ms / 1e6
        result.note = (f"{result.forward_ms * 1e3:.0f} us, {result.bandwidth_gb_s:.0f} GB/s"
                       f" = {result.bandwidth_gb_s * 1e9 / copy_bandwidth():.0%} of copy")
    except Exception as e:  # a peer that cannot run this shape is reported, not fatal
        result.note = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
    return result


def _builtin_pallas_decode(q, k, v, lengths, *, interpret: bool):
    from jax.experimental.pallas.ops.gpu import decode_attention as jax_decode

    return jax_decode.gqa(q[:, 0], k, v, kv_seq_len=lengths, interpret=interpret)


def _sdpa_decode(q, k, v, lengths, *, implementation: str):
    return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation=implementation)


def format_results(results: list[Result]) -> str:
    """The results as an aligned table."""
    header = ["suite", "case", "impl", "S", "fwd ms", "fwd TF/s", "f+b ms", "f+b TF/s", "f+b temp mem", "note"]
    fmt = lambda x, spec: "-" if x is None else format(x, spec)
    rows = [[r.suite, r.case, r.impl, str(r.seq_len), fmt(r.forward_ms, ".3f"), fmt(r.forward_tflops, ".1f"),
             fmt(r.forward_backward_ms, ".3f"), fmt(r.forward_backward_tflops, ".1f"),
             format_bytes(r.temp_memory_bytes), r.note] for r in results]
    return format_table(header, rows, "<<<>>>>>><")


def default_json_path(device_kind: str) -> pathlib.Path:
    """``bench_out/bench_<device>_<date>_<time>.json`` (``bench_out/`` is git-ignored)."""
    device = re.sub(r"[^a-z0-9]+", "_", device_kind.lower()).strip("_")
    return JSON_FOLDER / f"bench_{device}_{datetime.datetime.now():%Y-%m-%d_%H%M%S}.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m complexity_jax.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suites", nargs="+", default=list(SUITES), choices=SUITES, metavar="SUITE",
                   help=f"which suites to run, any of: {' '.join(SUITES)} (default: all of them)")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes (batch 1, 4 query / 2 KV heads, head_dim 32, float32, S=128 or 256) and 2 timed"
                        " runs: checks that everything runs, on any machine, in about a minute")
    p.add_argument("--seq-lens", type=int, nargs="+", metavar="S",
                   help="sequence lengths (decode: cache lengths) for every suite; default per suite: softmax 8192"
                        " 32768, multiscale 8192, sparse 4096 16384 65536, linear 8192 32768 131072, decode 4096"
                        " 32768 131072, packed 8192, options 8192")
    p.add_argument("--window", type=int, default=1024,
                   help="the sliding window; multi-scale's local heads use a quarter, half and all of it"
                        " (default: 1024, or 32 with --quick)")
    p.add_argument("--repeats", type=int, help="timed runs per measurement, the median is reported (default: 20,"
                                                " or 2 with --quick)")
    p.add_argument("--json", type=pathlib.Path,
                   help="where to write the raw results (default: a new file in bench_out/ named after the device"
                        " and the time)")
    return p.parse_args(argv)


def plan(args: argparse.Namespace, interpret: bool) -> tuple[Shape, dict, list[Case]]:
    """The shape, the settings recorded in the JSON, and every case of the requested suites."""
    if args.quick:
        shape = Shape(batch=1, seq_len=128, num_heads=4, num_kv_heads=2, head_dim=32, dtype="float32")
        default_lens = {"softmax": [128], "linear": [128], "sparse": [256], "decode": [256], "packed": [256],
                        "options": [128]}
        window, repeats = min(args.window, 32), args.repeats or 2
    else:
        shape = Shape(batch=2, seq_len=8192, num_heads=32, num_kv_heads=8, head_dim=128, dtype="bfloat16")
        default_lens = {"softmax": [8192, 32768], "linear": [8192, 32768, 131072], "sparse": [4096, 16384, 65536],
                        "decode": [4096, 32768, 131072], "packed": [8192], "options": [8192]}
        window, repeats = args.window, args.repeats or 20
    lens = {suite: args.seq_lens or default for suite, default in default_lens.items()}
    decode_batch = 2 if args.quick else 8
    cases: list[Case] = []
    if "softmax" in args.suites:
        cases += softmax_suite(shape, lens["softmax"], window, repeats, interpret)
    if "multiscale" in args.suites:
        cases += multiscale_suite(dataclasses.replace(shape, seq_len=lens["softmax"][0]), window, repeats, interpret)
    if "linear" in args.suites:
        cases += linear_suite(shape, lens["linear"], repeats, interpret)
    if "sparse" in args.suites:
        cases += sparse_suite(shape, lens["sparse"], repeats, interpret)
    if "decode" in args.suites:
        cases += decode_suite(shape, lens["decode"], decode_batch, window, repeats, interpret)
    if "packed" in args.suites:
        cases += packed_suite(shape, lens["packed"], repeats, interpret)
    if "options" in args.suites:
        cases += options_suite(shape, lens["options"], repeats, interpret)
    settings = {"shape": dataclasses.asdict(shape), "window": window, "repeats": repeats, "decode_batch": decode_batch}
    return shape, settings, cases


def run_cases(cases: list[Case]) -> list[Result]:
    """Measures every case in order, with a progress bar on a terminal."""
    console = Console(stderr=True)
    columns = (TextColumn("{task.description:<60}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    results = []
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("", total=len(cases))
        for case in cases:
            progress.update(task, description=case.description)
            results.append(case.run())
            progress.advance(task)
    return results


def run_meta(settings: dict) -> dict:
    """The raw JSON's ``meta``: this process's device, backend and JAX version, and the run's ``settings``."""
    return {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
            **settings}


def write_results(path: pathlib.Path, meta: dict, results: list[Result]) -> None:
    """The raw JSON that BENCHMARKS.md and notebooks/benchmarks.ipynb read: ``{"meta": ..., "results": [...]}``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "results": [dataclasses.asdict(r) for r in results]}, indent=1))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    shape, settings, cases = plan(args, interpret=not ON_GPU)
    meta = run_meta(settings)
    print(f"device {meta['device']}, jax {meta['jax']}, batch {shape.batch}, heads {shape.num_heads}/"
          f"{shape.num_kv_heads}, head_dim {shape.head_dim}, {shape.dtype}, window {settings['window']},"
          f" {settings['repeats']} timed runs per number; {len(cases)} rows"
          + ("" if ON_GPU else " (no GPU: the Pallas kernels run in interpret mode, their times mean nothing)"),
          flush=True)
    results = run_cases(cases)
    meta.update({"copy_bandwidth_gb_s": r.bandwidth_gb_s for r in results if r.case == COPY_CASE})
    print(format_results(results))
    path = args.json or default_json_path(meta["device"])
    write_results(path, meta, results)
    print(f"raw results written to {path.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
