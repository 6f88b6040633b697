"""Argument checks shared by the ops and the layers: each error names the argument, its value and what is allowed."""

from __future__ import annotations

from typing import Any

IMPLEMENTATIONS = ("auto", "pallas", "pallas_triton", "pallas_mosaic", "xla")
FEATURE_MAPS = ("elu", "relu", "softmax")


def check_positive(**values: Any) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}")
        if value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value}")


def check_non_negative(**values: Any) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}")
        if value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value}")


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_window(name: str, value: Any) -> None:
    """A window is a positive int or None (unlimited)."""
    if value is not None:
        check_positive(**{name: value})


def check_sparse_config(config: Any) -> None:
    check_positive(block_size=config.block_size, num_heads=config.num_heads)
    check_non_negative(num_global_tokens=config.num_global_tokens,
                       num_random_blocks=config.num_random_blocks)
    check_positive(num_local_blocks=config.num_local_blocks)
    if not isinstance(config.seed, int) or isinstance(config.seed, bool):
        raise TypeError(f"seed must be an int, got {config.seed!r}")


def check_attention_inputs(q: Any, k: Any, v: Any, *, causal: bool) -> tuple[int, int]:
    """Checks ``[batch, seq, heads, head_dim]`` q/k/v; returns ``(num_heads, num_kv_heads)``."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(
                f"{name} must have rank 4 [batch, seq, heads, head_dim], got shape {getattr(x, 'shape', None)}"
            )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {k.shape} and v {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q and k must agree in batch and head_dim, got q {q.shape} and k {k.shape}"
        )
    num_heads, num_kv_heads = q.shape[2], k.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(
            f"the number of query heads ({num_heads}) must be a multiple of the number of key/value heads"
            f" ({num_kv_heads})"
        )
    if q.shape[1] > k.shape[1] and causal:
        raise ValueError(
            f"q_len ({q.shape[1]}) must not exceed kv_len ({k.shape[1]}): queries are the last positions"
            " of the key sequence"
        )
    return num_heads, num_kv_heads
