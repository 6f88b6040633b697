"""Device-side timing and compiled-memory helpers shared by the main job and the benchmark."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax


def median_ms(fn: Callable[..., Any], *args: Any, warmup: int = 2, repeats: int = 10, calls: int = 1) -> float:
    """Median wall time of one ``fn(*args)`` in ms.

    Each sample dispatches ``calls`` runs back to back and closes with ``block_until_ready``, then divides:
    with ``calls > 1`` the host round trip of the final sync is spread over the runs, which matters for
    kernels of a few microseconds. ``fn`` should be jitted; warm-up runs keep compilation out of the numbers.
    """
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls - 1):
            fn(*args)
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3 / calls)
    return statistics.median(times)


def temp_memory_bytes(fn: Callable[..., Any], *args: Any) -> int | None:
    """Temporary (scratch) bytes of the compiled executable of ``jax.jit(fn)(*args)``, or None if unknown."""
    compiled = jax.jit(fn).lower(*args).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return int(analysis.temp_size_in_bytes)


def format_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> str:
    """A plain-text table whose columns are as wide as their widest cell; ``align`` holds ``<`` or ``>`` per column."""
    if len(align) != len(header) or any(len(row) != len(header) for row in rows):
        raise ValueError(f"every row and align need {len(header)} columns")
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(f"{cell:{a}{w}}" for cell, a, w in zip(cells, align, widths)).rstrip()

    rule = "-" * len(line(["-" * w for w in widths]))
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def kernel_paths(fn: Callable[..., Any], *args: Any) -> str:
    """Which paths the program of ``fn(*args)`` runs, read from its jaxpr: ``"XLA"`` when it holds no Pallas kernel,
    else its Pallas backends (``"Pallas-Triton"``, ``"Pallas-Mosaic"``, with ``" interpret"`` when they run in
    Pallas interpret mode), joined by ``" + "``. A Pallas kernel is an equation with ``compiler_params`` (Triton
    kernels are ``pallas_call``s, Mosaic GPU's warp-specialised ones ``mpmd_map``s); the module of those parameters
    names the backend."""
    found: set[str] = set()

    def visit(jaxpr: Any) -> None:
        for eqn in jaxpr.eqns:
            if "compiler_params" in eqn.params:
                module = type(eqn.params["compiler_params"]).__module__
                backend = "Pallas-Mosaic" if "mosaic" in module else "Pallas-Triton" if "triton" in module else "Pallas"
                found.add(f"{backend} interpret" if eqn.params.get("interpret") else backend)
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if hasattr(sub, "eqns"):  # a Jaxpr
                        visit(sub)
                    elif hasattr(getattr(sub, "jaxpr", None), "eqns"):  # a ClosedJaxpr
                        visit(sub.jaxpr)

    visit(jax.make_jaxpr(fn)(*args).jaxpr)
    return " + ".join(sorted(found)) or "XLA"
