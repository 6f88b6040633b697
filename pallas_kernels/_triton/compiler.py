"""Launch settings of the Triton kernels: every ``pallas_call`` here builds its ``compiler_params`` through this module.

The choice between the Triton and Mosaic GPU backends is made above the kernels (``_dispatch.py``,
``_softmax_kernels.py``).
"""

from __future__ import annotations

import warnings

from jax.experimental import pallas as pl

with warnings.catch_warnings():
    # jax.experimental.pallas.triton is deprecated upstream in favour of Mosaic GPU; we choose it on purpose.
    warnings.simplefilter("ignore", DeprecationWarning)
    from jax.experimental.pallas import triton as plgpu


def compiler_params(num_warps: int, num_stages: int):
    """Pallas ``compiler_params`` that select the Triton lowering with these launch settings."""
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


__all__ = ["compiler_params", "pl", "plgpu"]
