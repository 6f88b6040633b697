"""Attention kernels for JAX: Pallas GPU kernels with a pure-JAX (XLA) reference behind one API.

Layout ``[batch, seq, heads, head_dim]``; keys/values may have fewer heads (GQA).
"""

from pallas_kernels._mosaic.softmax import MosaicConfig
from pallas_kernels._triton.decode import DecodeConfig
from pallas_kernels._triton.softmax import KernelConfig
from pallas_kernels.context_parallel import context_parallel_attention, context_parallel_linear_attention
from pallas_kernels.linear_attention import linear_attention
from pallas_kernels.masks import SparseMask, WindowMask, sparse_mask
from pallas_kernels.reference import LinearState
from pallas_kernels.softmax_attention import (
    attention_at_positions,
    decode_attention,
    flash_attention,
    multiscale_attention,
    sparse_attention,
)

__all__ = [
    "DecodeConfig",
    "KernelConfig",
    "LinearState",
    "MosaicConfig",
    "SparseMask",
    "WindowMask",
    "attention_at_positions",
    "context_parallel_attention",
    "context_parallel_linear_attention",
    "decode_attention",
    "flash_attention",
    "linear_attention",
    "multiscale_attention",
    "sparse_attention",
    "sparse_mask",
]
