"""Device-side timing and compiled-memory helpers shared by the main job and the benchmark."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
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
