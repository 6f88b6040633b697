"""Kernel output types that work inside ``jax.shard_map(check_vma=True)``.

Inside a ``shard_map`` with varying-manual-axes checking, Pallas needs each output's ``ShapeDtypeStruct`` to say over
which mesh axes it varies; our kernels' outputs vary like their query input. Outside ``shard_map`` the struct is plain.
"""

from __future__ import annotations

import inspect

import jax
from jaxtyping import Array

# JAX 0.10-0.11 call the field ``manual_axis_type``; later releases may call it ``vma``.
_FIELD = next((f for f in ("manual_axis_type", "vma")
               if f in inspect.signature(jax.ShapeDtypeStruct).parameters), None)


def out_struct(shape, dtype, like: Array) -> jax.ShapeDtypeStruct:
    """The type of a kernel output of ``shape``/``dtype`` that varies over the same manual axes as ``like``."""
    value = getattr(jax.typeof(like), _FIELD, None) if _FIELD else None
    if value is None:
        return jax.ShapeDtypeStruct(shape, dtype)
    return jax.ShapeDtypeStruct(shape, dtype, **{_FIELD: value})


def varying_axes(x: Array) -> frozenset[str]:
    """The manual mesh axes over which ``x`` varies (empty outside ``shard_map``)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return frozenset(getattr(mat, "varying", ()))
    return frozenset(getattr(aval, "vma", ()))


def vary_like(x: Array, like: Array) -> Array:
    """``x`` marked as varying over the manual axes of ``like`` too (e.g. a zero initial ``scan`` carry whose
    updates vary): ``jax.lax.pcast`` over the missing axes; a no-op outside ``shard_map``."""
    missing = tuple(sorted(varying_axes(like) - varying_axes(x)))
    return jax.lax.pcast(x, missing, to="varying") if missing else x
