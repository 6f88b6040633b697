"""Argument checks shared by the ops and the layers: each error names the argument, its value and what is allowed.

Static arguments (sizes, windows, seeds, flags, scales) shape the kernels, so they must be concrete Python (or
NumPy) values; a traced one raises a ``TypeError`` that says so rather than a bare concretization error.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("auto", "pallas", "pallas_triton", "pallas_mosaic", "xla")
FEATURE_MAPS = ("elu", "relu", "softmax")
# Dtypes the ops take; the Pallas kernels serve all but float64, which runs on the XLA path.
FLOAT_DTYPES = tuple(jnp.dtype(d) for d in (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64))
KERNEL_DTYPES = FLOAT_DTYPES[:3]


def _dtype_names(dtypes: tuple[jnp.dtype, ...]) -> str:
    return ", ".join(d.name for d in dtypes)


def _reject_traced(name: str, value: Any, what: str) -> None:
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"{name} must be a static Python {what} (it is fixed when the computation is traced), got a traced value"
            f" {value!r}; pass it as a Python value, e.g. with jax.jit(..., static_argnames=...)"
        )


def static_int(name: str, value: Any) -> int:
    """``value`` as a Python int: a Python or NumPy integer (not a bool, a float or a traced value)."""
    _reject_traced(name, value, "int")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}")
    return int(value)


def check_positive(**values: Any) -> None:
    for name, value in values.items():
        if static_int(name, value) <= 0:
            raise ValueError(f"{name} must be a positive int, got {value}")


def check_non_negative(**values: Any) -> None:
    for name, value in values.items():
        if static_int(name, value) < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value}")


def check_bool(**values: Any) -> None:
    """Flags such as ``causal``: a Python or NumPy bool (a string such as ``"no"`` would read as true)."""
    for name, value in values.items():
        _reject_traced(name, value, "bool")
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be a bool (True or False), got {value!r} of type {type(value).__name__}")


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_window(name: str, value: Any) -> int | None:
    """A window is a positive int or None (unlimited); returns it as a Python int or None."""
    if value is None:
        return None
    check_positive(**{name: value})
    return int(value)


def positive_real(name: str, value: Any) -> float:
    """A finite number > 0 (not a bool or a traced value), as a Python float."""
    _reject_traced(name, value, "float")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def softmax_scale_or_default(softmax_scale: Any, head_dim: int) -> float:
    """``softmax_scale`` as a Python float: any finite real number (negative and zero included), or None for
    ``head_dim ** -0.5``."""
    if softmax_scale is None:
        return head_dim**-0.5
    _reject_traced("softmax_scale", softmax_scale, "float")
    if isinstance(softmax_scale, (bool, np.bool_)) or not isinstance(softmax_scale, numbers.Real):
        raise TypeError(
            f"softmax_scale must be a real number or None, got {softmax_scale!r} of type {type(softmax_scale).__name__}"
        )
    if not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale!r}")
    return float(softmax_scale)


def check_float_dtype(name: str, dtype: Any) -> jnp.dtype:
    """A computation dtype (layers' ``dtype``, ``param_dtype``, ``init_cache``'s ``dtype``): one of ``FLOAT_DTYPES``."""
    try:
        resolved = None if dtype is None else jnp.dtype(dtype)
    except TypeError:
        resolved = None
    # ``np.dtype(...) == None`` is true (None reads as float64), hence the explicit test.
    if resolved is None or resolved not in FLOAT_DTYPES:
        got = dtype if resolved is None else resolved.name
        raise TypeError(f"{name} must be a floating-point dtype ({_dtype_names(FLOAT_DTYPES)}), got {got!r}")
    return resolved


def kernel_dtype_reason(*arrays: Any) -> str | None:
    """Why the Pallas kernels cannot take these arrays' dtype (``None`` if they can)."""
    dtype = jnp.result_type(*arrays)
    if dtype not in KERNEL_DTYPES:
        return f"the Pallas kernels take {_dtype_names(KERNEL_DTYPES)}, got {dtype.name}"
    return None


def check_sparse_config(config: Any) -> None:
    check_positive(block_size=config.block_size, num_heads=config.num_heads)
    check_non_negative(num_global_tokens=config.num_global_tokens,
                       num_random_blocks=config.num_random_blocks, seed=config.seed)
    check_positive(num_local_blocks=config.num_local_blocks)
    check_bool(causal=config.causal)


def check_attention_inputs(q: Any, k: Any, v: Any, *, causal: bool) -> tuple[int, int]:
    """Checks ``[batch, seq, heads, head_dim]`` floating q/k/v with no empty axis; returns
    ``(num_heads, num_kv_heads)``."""
    check_bool(causal=causal)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(
                f"{name} must have rank 4 [batch, seq, heads, head_dim], got shape {getattr(x, 'shape', None)}"
            )
        if jnp.dtype(x.dtype) not in FLOAT_DTYPES:
            raise TypeError(
                f"{name} must be a floating-point array ({_dtype_names(FLOAT_DTYPES)}), got dtype {x.dtype}"
            )
        if 0 in x.shape:
            raise ValueError(
                f"{name} has an empty axis, shape {x.shape} [batch, seq, heads, head_dim]: every axis must have"
                " size >= 1"
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


def _concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _int_array(name: str, value: Any, shape: str) -> jax.Array:
    """``value`` (an array or a nested list of ints) as an integer array, else a ``TypeError`` naming it."""
    if not hasattr(value, "dtype"):
        try:
            value = np.asarray(value)
        except (TypeError, ValueError) as error:
            raise TypeError(f"{name} must be an integer array {shape}, got {type(value).__name__}") from error
    if not jnp.issubdtype(value.dtype, jnp.integer):  # bool is not an integer dtype here
        raise TypeError(f"{name} must be an integer array {shape}, got dtype {value.dtype}")
    return jnp.asarray(value)


def check_segment_ids(name: str, ids: Any, batch: int, length: int) -> jax.Array:
    """Segment ids: an integer ``[batch, length]`` array of non-negative ids (checked where concrete); as int32."""
    ids = _int_array(name, ids, f"[batch, seq] = [{batch}, {length}]")
    if ids.shape != (batch, length):
        raise ValueError(f"{name} must have shape [batch, seq] = ({batch}, {length}), got {ids.shape}")
    if _concrete(ids) and ids.size and int(np.asarray(ids).min()) < 0:
        raise ValueError(f"{name} must hold non-negative ids, got a minimum of {int(np.asarray(ids).min())}")
    return ids.astype(jnp.int32)


def check_seq_lengths(name: str, lengths: Any, batch: int, length: int, length_name: str = "seq_len") -> jax.Array:
    """Sequence lengths: an integer ``[batch]`` array with values in ``[0, length]`` (checked where concrete; traced
    values cannot be, and values outside that range give unspecified outputs)."""
    lengths = _int_array(name, lengths, f"[batch] = [{batch}]")
    if lengths.shape != (batch,):
        raise ValueError(f"{name} must have shape [batch] = ({batch},), got {lengths.shape}")
    if _concrete(lengths):
        values = np.asarray(lengths)
        bad = (values < 0) | (values > length)
        if bad.any():
            raise ValueError(f"{name} must lie in [0, {length_name}={length}], got {values.tolist()} (rows"
                             f" {np.flatnonzero(bad).tolist()} out of range)")
    return lengths.astype(jnp.int32)


def logits_soft_cap_or_none(value: Any) -> float | None:
    """``logits_soft_cap``: None or a finite number > 0."""
    return None if value is None else positive_real("logits_soft_cap", value)


def check_sinks(sinks: Any, num_heads: int) -> jax.Array | None:
    """``sinks``: None or a floating ``[num_heads]`` array (one logit per query head)."""
    if sinks is None:
        return None
    sinks = jnp.asarray(sinks)
    if not jnp.issubdtype(sinks.dtype, jnp.floating):
        raise TypeError(f"sinks must be a floating-point array, got dtype {sinks.dtype}")
    if sinks.shape != (num_heads,):
        raise ValueError(f"sinks must have shape [num_heads] = ({num_heads},), got {sinks.shape}")
    return sinks
