"""Partitioning of the Pallas kernels under ``jax.jit`` with sharded inputs: each device runs its own batch rows and
heads, with no collective (``jax.experimental.custom_partitioning``).

A kernel call is described by the layout of each array it takes and returns, one letter per dimension: ``b`` batch,
``h`` query heads, ``k`` key/value heads, ``.`` anything else (kept whole on every device). Batch follows the mesh
axes of the first argument's batch dimension; heads follow the mesh axes of its head dimension when every device
then holds whole KV heads with their query groups (``kv_heads`` divisible by the number of head shards); otherwise
heads stay whole (gathered), batch is still split. A mask that differs between heads (per-head windows, sparse random
blocks) is split too: each device runs the mask of the global heads it holds (``per_head_shard``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def partitioned(
    kernel: Callable[..., Any],
    in_layouts: Sequence[str],
    out_layouts: Sequence[str],
    *,
    group: int,
    head_dependent: bool = False,
) -> Callable[..., Any]:
    """``kernel(*arrays)`` (one array per layout, results in ``out_layouts`` order) that partitions over batch/heads.

    ``kernel`` is called on each device's shards and must compute the same function of them as of the whole arrays.
    ``head_dependent``: the kernel's result depends on which heads a device holds (per-head windows, sparse random
    blocks); it is then called as ``kernel(*arrays, head_shard=(index, count))`` with the device's head shard
    (a traced index) and the number of shards.
    """
    single = len(out_layouts) == 1

    def specs(mesh, arg_shapes):
        batch_axes, head_axes = _axes(mesh, arg_shapes, in_layouts, group)
        make = lambda layout: NamedSharding(
            mesh, P(*(batch_axes if c == "b" else head_axes if c in "hk" else None for c in layout)))
        return [make(layout) for layout in in_layouts], [make(layout) for layout in out_layouts], head_axes

    def partition(mesh, arg_shapes, result_shape):
        arg_shardings, out_shardings, head_axes = specs(mesh, arg_shapes)
        local = kernel
        if head_dependent:
            names = () if head_axes is None else head_axes if isinstance(head_axes, tuple) else (head_axes,)
            count = math.prod(mesh.shape[name] for name in names)
            index = lambda: jax.lax.axis_index(names) if names else 0
            local = lambda *arrays: kernel(*arrays, head_shard=(index(), count))
        return mesh, local, out_shardings[0] if single else tuple(out_shardings), tuple(arg_shardings)

    def infer(mesh, arg_shapes, result_shape):
        out_shardings = specs(mesh, arg_shapes)[1]
        return out_shardings[0] if single else tuple(out_shardings)

    wrapped = custom_partitioning(lambda *arrays: kernel(*arrays))  # unpartitioned: every head
    wrapped.def_partition(
        partition=partition,
        infer_sharding_from_operands=infer,
        sharding_rule=_rule(in_layouts, out_layouts, group),
        **({"g": group} if group > 1 else {}),
    )
    return _vmap_into_batch(wrapped)


def _vmap_into_batch(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (arrays with batch at axis 0) under ``jax.vmap`` as one call with the mapped axis folded into the batch
    (``custom_partitioning`` has no batching rule of its own)."""
    folded = custom_vmap(fn)

    @folded.def_vmap
    def rule(axis_size, in_batched, *args):
        args = [x if batched else jnp.broadcast_to(x, (axis_size, *x.shape)) for x, batched in zip(args, in_batched)]
        outs = folded(*(x.reshape(axis_size * x.shape[1], *x.shape[2:]) for x in args))
        unfold = lambda y: y.reshape(axis_size, y.shape[0] // axis_size, *y.shape[1:])
        return jax.tree.map(unfold, outs), jax.tree.map(lambda _: True, outs)

    return folded


def _rule(in_layouts: Sequence[str], out_layouts: Sequence[str], group: int) -> str:
    """Einsum-like Shardy rule: query heads are the compound factor ``(k g)`` of KV heads and the group."""
    count = iter(range(10**6))

    def factors(layout: str) -> str:
        named = {"b": "b", "h": "(k g)" if group > 1 else "k", "k": "k"}
        return " ".join(named.get(c) or f"x{next(count)}" for c in layout)

    return f"{', '.join(map(factors, in_layouts))} -> {', '.join(map(factors, out_layouts))}"


def _axes(mesh, arg_shapes, in_layouts: Sequence[str], group: int):
    """Mesh axes of the batch and head dimensions, taken from the first argument with each dimension."""
    batch_axes = head_axes = None
    for shape, layout in zip(arg_shapes, in_layouts):
        spec = tuple(getattr(shape.sharding, "spec", ())) + (None,) * len(layout)
        if batch_axes is None and "b" in layout:
            batch_axes = _fitting(mesh, spec[layout.index("b")], shape.shape[layout.index("b")])
        for c in "hk":
            if head_axes is None and c in layout:
                kv_heads = shape.shape[layout.index(c)] // (group if c == "h" else 1)
                head_axes = _fitting(mesh, spec[layout.index(c)], kv_heads)
    return batch_axes, head_axes


def _fitting(mesh, axes: Any, size: int):
    """``axes`` if they split ``size`` evenly, else ``None`` (keep the dimension whole)."""
    if axes is None:
        return None
    names = axes if isinstance(axes, tuple) else (axes,)
    shards = math.prod(mesh.shape[name] for name in names)
    return axes if size % shards == 0 else None


def per_head_shard(run: Callable[[Any], Any], mask: Any, shard: Any, num_shards: int) -> Any:
    """``run(local_mask)`` with ``local_mask`` the heads of head shard ``shard`` (traced) of ``num_shards`` equal
    shards of ``mask`` (anything with ``num_heads`` and ``heads(start, count)``: ``WindowMask``, ``SparseMask``, the
    decode kernel's masks): one static branch per shard (``lax.switch``)."""
    if num_shards == 1:
        return run(mask)
    local = mask.num_heads // num_shards
    branches = [functools.partial(run, mask.heads(i * local, local)) for i in range(num_shards)]
    return jax.lax.switch(shard, branches)


def wanted() -> bool:
    """Whether a kernel call should be wrapped: several devices, and not already inside ``shard_map`` (whose body
    sees its local blocks already) nor under a one-device context mesh (such as the abstract mesh of a lowering for a
    GPU the host does not have, where ``custom_partitioning`` cannot lower)."""
    context = jax.sharding.get_abstract_mesh()
    if not context.empty and (context.manual_axes or context.size == 1):
        return False
    return jax.device_count() > 1


__all__ = ["partitioned", "per_head_shard", "wanted"]
