"""Choosing between the Pallas backends (Mosaic GPU, Triton) and the pure-JAX (XLA) path."""

from __future__ import annotations

from collections.abc import Mapping

import jax

from pallas_kernels._validation import IMPLEMENTATIONS, check_choice

# Preference order of the Pallas backends where several serve a call (fastest first, BENCHMARKS.md).
PALLAS_BACKENDS = ("mosaic", "triton")


def use_pallas(implementation: str, op_name: str, unsupported: str | None) -> bool:
    """True when ``op_name``, which has only Triton kernels (or none), should run them; ``unsupported`` is ``None``
    when its Triton kernel serves the call, else the reason it cannot."""
    return choose_backend(implementation, op_name, {"triton": unsupported}) != "xla"


def choose_backend(implementation: str, op_name: str, kernels: Mapping[str, str | None]) -> str:
    """``"mosaic"``, ``"triton"`` or ``"xla"``: which path runs ``op_name``.

    ``kernels`` maps each Pallas backend to ``None`` if it serves the call, else the reason it cannot (a backend not
    listed has no kernel for this op). ``"auto"``: the first serving backend of ``PALLAS_BACKENDS`` on a GPU, XLA
    elsewhere or where none serves. ``"pallas"``: the first serving backend. ``"pallas_triton"`` /
    ``"pallas_mosaic"``: that backend. ``"xla"``: the pure-JAX path. A forced choice that cannot be served raises
    ``NotImplementedError`` with the reasons; there is never a silent fallback.
    """
    check_choice("implementation", implementation, IMPLEMENTATIONS)
    if implementation == "xla":
        return "xla"
    reasons = {name: kernels.get(name, f"{op_name} has no {name} kernel") for name in PALLAS_BACKENDS}
    if implementation.startswith("pallas_"):
        name = implementation.removeprefix("pallas_")
        if reasons[name] is not None:
            raise NotImplementedError(
                f"{op_name}: implementation={implementation!r} cannot serve this call: {reasons[name]}; use"
                " implementation='auto', 'pallas' or 'xla'"
            )
        return name
    serving = [name for name in PALLAS_BACKENDS if reasons[name] is None]
    if implementation == "pallas":
        if not serving:
            why = "; ".join(f"{name}: {reason}" for name, reason in reasons.items())
            raise NotImplementedError(f"{op_name} has no Pallas kernel for these arguments ({why}); use"
                                      " implementation='xla' or 'auto'")
        return serving[0]
    if jax.default_backend() != "gpu" or not serving:
        return "xla"
    return serving[0]
