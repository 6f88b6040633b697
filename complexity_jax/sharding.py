"""Sharding the layers over a mesh: data parallel over the batch, tensor parallel over the heads.

The layers' projection kernels have Flax logical axes (``layers.PROJECTION_AXES``, boxed into the parameters with
``logical_partitioning=True``): q/k/v projections ``("embed", "heads" | "kv_heads")``, the output projection
``("heads", "embed")``; the attention sinks of ``use_sinks=True`` layers ``("heads",)`` (``layers.PARAMETER_AXES``).
``LOGICAL_AXIS_RULES`` maps them
onto a mesh with axes ``"data"`` and ``"model"``: batch over ``"data"``, heads over ``"model"``, the model width
whole. Under ``jax.jit`` with inputs and parameters placed this way the attention kernels run each device's batch
rows and heads locally (``pallas_kernels._partitioning``); the only collectives are those of the output projection
(Megatron-style: a reduction over ``"model"``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from complexity_jax.layers import PARAMETER_AXES

LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("embed", None),
)


def logical_specs(params: Any) -> Any:
    """The logical ``PartitionSpec`` of every parameter: from the boxes of ``logical_partitioning=True`` layers, else
    from the parameter names (``layers.PARAMETER_AXES``: projections and sinks; anything else replicated)."""

    def spec(path, leaf) -> P:
        if isinstance(leaf, nn.LogicallyPartitioned):
            return P(*leaf.names)
        names = [getattr(key, "key", None) for key in path]
        return next((P(*PARAMETER_AXES[n]) for n in reversed(names) if n in PARAMETER_AXES), P())

    return jax.tree_util.tree_map_with_path(spec, params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def param_shardings(params: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
    """``NamedSharding`` of every parameter of ``params`` (as returned by ``init``, boxed or not), unboxed."""
    return nn.logical_to_mesh_sharding(logical_specs(params), mesh, rules)


def cache_shardings(cache: Any, mesh: Mesh, batch_axis: str | None = "data", head_axis: str | None = "model") -> Any:
    """``NamedSharding`` of every array of a layer's cache: keys/values ``[b, length, kv_heads, d]`` and linear states
    ``[b, kv_heads, ...]`` over ``batch_axis`` and ``head_axis``, per-row lengths ``[b]`` over ``batch_axis`` (each
    only where it splits evenly), scalars (the overflow flag) replicated."""

    def fits(axis: str | None, size: int) -> str | None:
        return axis if axis is not None and size % mesh.shape[axis] == 0 else None

    def sharding(path, leaf) -> NamedSharding:
        names = {getattr(key, "name", None) for key in path}
        if leaf.ndim == 0:
            spec = P()
        elif leaf.ndim == 1:  # per-row lengths [b]
            spec = P(fits(batch_axis, leaf.shape[0]))
        elif "state" in names:  # LinearState: [b, kv_heads, d(, d)]
            spec = P(fits(batch_axis, leaf.shape[0]), fits(head_axis, leaf.shape[1]))
        else:  # keys / values: [b, length, kv_heads, d]
            spec = P(fits(batch_axis, leaf.shape[0]), None, fits(head_axis, leaf.shape[2]))
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(sharding, cache)


__all__ = ["LOGICAL_AXIS_RULES", "cache_shardings", "logical_specs", "param_shardings"]
