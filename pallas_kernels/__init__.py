"""Attention kernels for JAX: Pallas GPU kernels with a pure-JAX (XLA) reference behind one API.

Layout ``[batch, seq, heads, head_dim]``; keys/values may have fewer heads (GQA).

Guarantees (every op, both paths unless said):

- Numerics: inputs float16, bfloat16 or float32 (float64 on the XLA path); products take the input dtype and
  accumulate in float32 (float64 for float64 inputs); outputs have the input dtype. Linear attention keeps its
  state in float32 and runs float16 inputs as float32 (float16's range overflowed). Any finite ``softmax_scale``
  is allowed, zero and negative included. A query row that sees no key outputs zeros (given finite values).
- NaN/Inf: a non-finite key never reaches a query that does not see it (scores are masked before the softmax).
  A non-finite *value* that any query sees also reaches queries that do not see it (their weight is exactly 0, and
  0 * NaN = NaN in P @ V), rows that see no key included, on both paths: on the XLA path every query of its batch
  row reading its KV head, in the Pallas kernels every row of the query tiles that visit its key tile. A key/value
  position that no query of its (batch row, KV head) sees never reaches an output or a gradient on the XLA path and
  in ``decode_attention`` (padding, cache slots at or past ``lengths``, slots outside every window); the Pallas
  sequence kernels skip only whole tiles outside the mask, so such a value inside a visited tile reaches the tile's
  rows. Keep values finite (a decision: a select on every P @ V tile would make unseen ones harmless, at a cost
  not measured on the GPU). Non-finite inputs that a query does see propagate to its output.
- What raises: bad arguments raise ``TypeError`` (wrong type: a float or traced value where a static int is needed,
  integer/complex arrays) or ``ValueError`` (wrong value or shape: empty axes, negative seeds, lengths outside the
  cache) naming the argument, its value and what is allowed, when the op is called; a forced Pallas backend that
  cannot serve the call, and forward-mode or second-order differentiation through the Pallas kernels (use
  ``implementation="xla"``), raise ``NotImplementedError``.
"""

from pallas_kernels._mosaic.softmax import MosaicConfig
from pallas_kernels._triton.decode import DecodeConfig
from pallas_kernels._triton.softmax import KernelConfig
from pallas_kernels.context_parallel import (
    context_parallel_attention,
    context_parallel_linear_attention,
    from_zigzag,
    to_zigzag,
    zigzag_order,
)
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
    "from_zigzag",
    "linear_attention",
    "multiscale_attention",
    "sparse_attention",
    "sparse_mask",
    "to_zigzag",
    "zigzag_order",
]
