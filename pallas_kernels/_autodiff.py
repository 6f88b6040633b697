"""Clear errors for the derivatives the Pallas kernels do not define.

Each kernel family is a ``jax.custom_vjp`` with first-order reverse-mode rules (decode's backward is the XLA
path's, or an error under a forced Pallas implementation). JAX rejects forward mode
(``jax.jvp``, ``jax.jacfwd``) of such a function with a generic ``TypeError``, and differentiating the rules
themselves (grad of grad, ``jax.hessian``) fails deep inside Pallas with a bare ``AssertionError``. These
helpers turn both into a ``NotImplementedError`` that names the op and the way out (the XLA path, which JAX
differentiates to any order in either mode).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import jax

T = TypeVar("T")

# The tracers of JAX's differentiation traces (forward mode, and linearize behind jax.grad / jax.vjp).
_AD_TRACERS = ("JVPTracer", "LinearizeTracer")


def forward_mode_guard(op_name: str, inputs: tuple[Any, ...], call: Callable[[], T]) -> T:
    """``call()``, the ``custom_vjp`` op applied to ``inputs``; raises ``NotImplementedError`` naming ``op_name`` if
    ``inputs`` are differentiated in forward mode.

    With direct linearization (JAX's default) reverse mode traces ``LinearizeTracer``s and forward mode
    ``JVPTracer``s, so forward mode is caught before tracing, under ``jit`` too (where JAX would only fail at
    lowering). Otherwise JAX's own eager error is translated.
    """
    if jax.config.jax_use_direct_linearize and any(
        type(x).__name__ == "JVPTracer" for x in jax.tree.leaves(inputs)
    ):
        raise NotImplementedError(_forward_mode_message(op_name))
    try:
        return call()
    except TypeError as error:
        if "forward-mode" not in str(error):
            raise
        raise NotImplementedError(_forward_mode_message(op_name)) from error


# Ops whose Pallas kernel has no backward of its own: under implementation="auto" their first derivatives run the
# XLA backward, under a forced Pallas implementation they raise.
_NO_PALLAS_BACKWARD = ("decode_attention",)


def _defined(op_name: str, kernels_define: str) -> str:
    """The message's ``op_name: what its kernels differentiate`` part."""
    if op_name in _NO_PALLAS_BACKWARD:
        kernels_define = (
            "the Pallas kernel has no backward of its own (with implementation='auto', jax.grad and jax.vjp run the"
            " XLA backward; with a forced Pallas implementation they raise)"
        )
    return f"{op_name}: {kernels_define}"


def _forward_mode_message(op_name: str) -> str:
    return (
        f"{_defined(op_name, 'the Pallas kernels define reverse-mode derivatives only (jax.grad, jax.vjp)')};"
        " forward mode (jax.jvp, jax.jacfwd, jax.hessian) is not supported: use implementation='xla' for it"
    )


def reject_higher_order(op_name: str, *values: Any) -> None:
    """Called at the top of a ``custom_vjp`` rule: raises ``NotImplementedError`` if ``values`` are being
    differentiated, i.e. someone takes a derivative of the derivative."""
    if any(type(x).__name__ in _AD_TRACERS for x in jax.tree.leaves(values)):
        raise NotImplementedError(
            f"{_defined(op_name, 'the Pallas kernels define first derivatives only')}; second derivatives (grad of"
            " grad, jax.hessian, forward-over-reverse) are not supported: use implementation='xla' for them"
        )
