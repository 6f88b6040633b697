"""Choosing between the Pallas kernels and the pure-JAX (XLA) path."""

from __future__ import annotations

import jax

from pallas_kernels._validation import IMPLEMENTATIONS, check_choice


def use_pallas(implementation: str, op_name: str, has_kernel: bool) -> bool:
    """True when ``op_name`` should run its Pallas kernel.

    ``"auto"``: the kernel on a GPU backend, XLA elsewhere (and where no kernel exists yet).
    ``"pallas"``: the kernel, or ``NotImplementedError`` where there is none (never a silent fallback).
    ``"xla"``: the pure-JAX path.
    """
    check_choice("implementation", implementation, IMPLEMENTATIONS)
    if implementation == "xla":
        return False
    if implementation == "pallas":
        if not has_kernel:
            raise NotImplementedError(
                f"{op_name} has no Pallas kernel for these arguments; use implementation='xla' or 'auto'"
            )
        return True
    return has_kernel and jax.default_backend() == "gpu"
