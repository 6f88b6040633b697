"""Score-path math of the Triton kernels that the hardware does faster than libdevice.

The soft-cap's ``tanh`` runs on every score three times in a forward and backward (forward, dQ, dK/dV), beside the
``exp2`` of the softmax. libdevice's ``tanhf`` is a polynomial of about twenty instructions; PTX ``tanh.approx.f32``
is one special-function-unit instruction (sm_75+) with a maximum relative error of about 2^-11. Measured on an H200
(``benchmarks/ab_options.py``, S=8192 causal, bf16): the soft-cap costs +44% forward+backward with ``tanhf`` and
+17% with ``tanh.approx.f32``, at the same error against the float32 XLA path (2.1e-3).

The approximation is used for 16-bit inputs only, whose own rounding (2^-8 for bf16, 2^-11 for fp16) is at least as
coarse; float32 inputs keep ``tanhf``. Interpret mode has no PTX and uses ``jnp.tanh``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .compiler import plgpu

_APPROXIMATE_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def approximate_tanh_for(dtype, interpret: bool) -> bool:
    """Whether kernels over inputs of ``dtype`` use the hardware ``tanh`` (see the module docstring)."""
    return not interpret and jnp.dtype(dtype) in _APPROXIMATE_DTYPES


def tanh(x: Float[Array, "..."], approximate: bool) -> Float[Array, "..."]:
    """``tanh`` of a float32 tile: PTX ``tanh.approx.f32`` when ``approximate``, else libdevice."""
    if not approximate:
        return jnp.tanh(x)
    return plgpu.elementwise_inline_asm(
        "tanh.approx.f32 $0, $1;", args=[x], constraints="=r,r", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])[0]


__all__ = ["approximate_tanh_for", "tanh"]
