"""What the Triton compiler itself reaches on the causal forward: the Triton tutorial's fused-attention loop.

``python benchmarks/experiments/triton_tutorial_fwd.py OUT.json``: written directly in Triton (torch tensors), not through
Pallas, on the issue-3 shape (batch 2, 32 query / 8 KV heads, head_dim 128, bf16, causal, S=8192). The loop is the
tutorial's (``06-fused-attention.py``): unmasked blocks below the diagonal, then the diagonal block with its mask,
``exp2`` with the scale folded into one multiply-add, the accumulator rescaled and fed to the second dot. Loads are
plain pointer loads, like those the Pallas Triton lowering emits. The gap (or its absence) between this and our
Pallas kernel separates what the lowering costs from what Triton's code generation costs.

Variants switch on, one at a time, what the Pallas lowering emits differently (read from its Triton IR,
``pallas_call(debug=True)``): ``separate_acc`` (``acc * alpha + dot(p, v)`` instead of accumulating in the dot),
``k_rows`` (K loaded ``[BLOCK_N, D]`` and transposed instead of loaded transposed), ``libdevice_exp2`` (libdevice's
``__nv_exp2f`` instead of ``ex2.approx``), ``pallas_grid`` (grid ``(q blocks, batch, heads)``, Pallas's order, instead
of ``(q blocks, batch * heads)``). Each row also counts the ``wgmma`` instructions of the compiled PTX.
``python benchmarks/experiments/triton_tutorial_fwd.py OUT.json pallas_grid`` runs only the named variants beside the plain one.
"""

from __future__ import annotations

import json
import sys

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def _exp2(x, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        return libdevice.exp2(x)
    return tl.math.exp2(x)


@triton.jit
def _inner(acc, l_i, m_i, q, k_base, v_base, stride_s, offs_m, offs_n, offs_d, lo, hi, qk_scale,
           DIAGONAL: tl.constexpr, BLOCK_N: tl.constexpr, SEPARATE_ACC: tl.constexpr, K_ROWS: tl.constexpr,
           LIBDEVICE_EXP2: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if K_ROWS:
            k = tl.trans(tl.load(k_base + cols[:, None] * stride_s + offs_d[None, :]))
        else:
            k = tl.load(k_base + cols[None, :] * stride_s + offs_d[:, None])  # [D, BLOCK_N]
        qk = tl.dot(q, k)
        if DIAGONAL:
            qk = qk * qk_scale + tl.where(offs_m[:, None] >= cols[None, :], 0, -1.0e6)
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            qk -= m_ij[:, None]
        else:
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            qk = qk * qk_scale - m_ij[:, None]
        p = _exp2(qk, LIBDEVICE_EXP2)
        alpha = _exp2(m_i - m_ij, LIBDEVICE_EXP2)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = tl.load(v_base + cols[:, None] * stride_s + offs_d[None, :])
        if SEPARATE_ACC:
            acc = acc + tl.dot(p.to(v.dtype), v)
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _fwd(Q, K, V, O, qk_scale, S, H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SEPARATE_ACC: tl.constexpr, K_ROWS: tl.constexpr,
         LIBDEVICE_EXP2: tl.constexpr, PALLAS_GRID: tl.constexpr):
    start_m = tl.program_id(0)
    if PALLAS_GRID:  # grid (q blocks, batch, heads)
        b, h = tl.program_id(1), tl.program_id(2)
    else:  # grid (q blocks, batch * heads), heads fastest
        b, h = tl.program_id(1) // H, tl.program_id(1) % H
    q_stride_s, kv_stride_s = H * D, (H // GROUP) * D
    q_base = Q + b * S * q_stride_s + h * D
    kv_off = b * S * kv_stride_s + (h // GROUP) * D
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    q = tl.load(q_base + offs_m[:, None] * q_stride_s + offs_d[None, :])
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    acc, l_i, m_i = _inner(acc, l_i, m_i, q, K + kv_off, V + kv_off, kv_stride_s, offs_m, offs_n, offs_d,
                           0, start_m * BLOCK_M, qk_scale, False, BLOCK_N, SEPARATE_ACC, K_ROWS, LIBDEVICE_EXP2)
    acc, l_i, m_i = _inner(acc, l_i, m_i, q, K + kv_off, V + kv_off, kv_stride_s, offs_m, offs_n, offs_d,
                           start_m * BLOCK_M, (start_m + 1) * BLOCK_M, qk_scale, True, BLOCK_N, SEPARATE_ACC, K_ROWS,
                           LIBDEVICE_EXP2)
    acc = acc / l_i[:, None]
    tl.store(O + b * S * q_stride_s + h * D + offs_m[:, None] * q_stride_s + offs_d[None, :], acc.to(O.dtype.element_ty))


def attention(q, k, v, block_m, block_n, warps, stages, separate_acc=False, k_rows=False, libdevice_exp2=False,
              pallas_grid=False):
    """The output and the compiled kernel."""
    batch, seq, heads, d = q.shape
    out = torch.empty_like(q)
    grid = (seq // block_m, batch, heads) if pallas_grid else (seq // block_m, batch * heads)
    kernel = _fwd[grid](q, k, v, out, d ** -0.5 * 1.44269504, seq, heads, heads // k.shape[2], d, block_m, block_n,
                        separate_acc, k_rows, libdevice_exp2, pallas_grid, num_warps=warps, num_stages=stages)
    return out, kernel


def main(out_path: str) -> None:
    batch, seq, heads, kv_heads, d = 2, 8192, 32, 8, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(batch, seq, heads, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(batch, seq, kv_heads, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(batch, seq, kv_heads, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    flops = 4 * batch * heads * d * seq * (seq + 1) / 2
    # Correctness once, against torch's SDPA on the first query head group.
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(heads // kv_heads, 2).transpose(1, 2),
        v.repeat_interleave(heads // kv_heads, 2).transpose(1, 2), is_causal=True).transpose(1, 2)
    results = [dict(triton=triton.__version__, device=torch.cuda.get_device_name())]
    variants = [dict(), dict(separate_acc=True), dict(k_rows=True), dict(libdevice_exp2=True),
                dict(separate_acc=True, k_rows=True, libdevice_exp2=True), dict(pallas_grid=True)]
    if len(sys.argv) > 2:  # only the named flags, e.g. "pallas_grid"
        variants = [dict()] + [{name: True} for name in sys.argv[2].split(",")]
    for block_m, block_n, warps, stages, flags in [(128, 128, 8, 3, v) for v in variants] + [(128, 64, 8, 3, {})]:
        row = dict(block_m=block_m, block_n=block_n, warps=warps, stages=stages, **flags)
        try:
            out, kernel = attention(q, k, v, block_m, block_n, warps, stages, **flags)
            row["max_abs_err_vs_sdpa"] = float((out.float() - ref.float()).abs().max())
            ptx = kernel.asm["ptx"]
            row.update(wgmma=ptx.count("wgmma.mma_async"), mma_sync=ptx.count("mma.sync"))
            ms = triton.testing.do_bench(lambda: attention(q, k, v, block_m, block_n, warps, stages, **flags), rep=200)
            row.update(ms=ms, tflops=flops / ms / 1e9)
        except Exception as e:  # a variant that does not compile is reported, not fatal
            row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
        results.append(row)
        print(row, flush=True)
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
