"""The backend seam of the softmax family: one ``custom_vjp`` over either Pallas backend's kernels.

Both backends (``_triton/softmax.py``: any GPU, every mask; ``_mosaic/softmax.py``: Hopper+, window masks) expose
the same two entry points for the same mask description (``masks.WindowMask`` / ``masks.SparseMask``, GQA by head
ratio, queries the last positions of the keys):

- ``forward(q, k, v, mask, softmax_scale, ...) -> (out, lse)``, ``lse`` the base-2 log-sum-exp ``[batch, heads,
  q_len]``, ``+inf`` on rows that see no key;
- ``backward(mask, softmax_scale, ..., (q, k, v, out, lse), d_out) -> (dq, dk, dv)``.

The residuals are the same for both, so a forward of one backend can be differentiated by the other's backward
(the Mosaic forward at head_dim 256 uses the Triton backward, whose tiles fit in shared memory).

Options: a soft-cap (``Plan.logits_soft_cap``) and segment ids (``masks.Segments``) change the scores of both
passes; sinks only the forward (each row's running max and sum start from its sink), since ``lse`` then holds them
and the backward needs nothing else; their own gradient is computed here from ``lse`` and ``rowsum(dO * O)``. Only
the Triton kernels take options (``softmax_attention`` routes such calls there).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from pallas_kernels._autodiff import reject_higher_order
from pallas_kernels import _partitioning
from pallas_kernels._vma import vary_like
from pallas_kernels._mosaic import softmax as mosaic
from pallas_kernels._triton import softmax as triton
from pallas_kernels.masks import Segments, SparseMask, WindowMask

BACKENDS = ("mosaic", "triton")
_LOG2E = 1.4426950408889634


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which backend runs each pass, with its settings (static: part of the trace's cache key)."""

    mask: WindowMask | SparseMask
    softmax_scale: float
    forward_backend: str = "triton"
    backward_backend: str = "triton"
    triton_config: triton.KernelConfig | None = None
    mosaic_config: mosaic.MosaicConfig | None = None
    interpret: bool = False
    logits_soft_cap: float | None = None

    def __post_init__(self):
        for name in ("forward_backend", "backward_backend"):
            if getattr(self, name) not in BACKENDS:
                raise ValueError(f"{name} must be one of {BACKENDS}, got {getattr(self, name)!r}")


_SEGMENT_LAYOUTS = ("b.", "b.")


def forward(
    q: Array, k: Array, v: Array, plan: Plan, segments: Segments | None = None, sinks: Array | None = None
) -> tuple[Array, Array]:
    """Output and base-2 log-sum-exp of ``plan.forward_backend`` (``plan`` as returned by ``prepare``); under ``jit``
    with inputs sharded over batch/heads each device runs its own shard (``_partitioning``). ``sinks``: ``[heads]``."""
    options = () if segments is None else tuple(segments)
    layouts = _SEGMENT_LAYOUTS if segments is not None else ()
    if sinks is not None:  # per batch row, so that it partitions (and folds under vmap) like the other inputs
        options += (jnp.broadcast_to(sinks.astype(jnp.float32), (q.shape[0], q.shape[2])),)
        layouts += ("bh",)

    def run(local: Plan, q, k, v, *options):
        local_segments = Segments(*options[:2]) if segments is not None else None
        local_sinks = options[-1] if sinks is not None else None
        if local.forward_backend == "mosaic":
            assert local_sinks is None and local.logits_soft_cap is None, (
                "the Mosaic kernels take no soft-cap or sinks (softmax_attention routes them to Triton)")
            return mosaic.forward(q, k, v, local.mask, local.softmax_scale, local.mosaic_config, local_segments)
        return triton.forward(q, k, v, local.mask, local.softmax_scale, local.interpret, local.triton_config,
                              local.logits_soft_cap, local_segments, local_sinks)

    return _partitioned(run, plan, (q, k, v, *options), ("b.h.", "b.k.", "b.k.", *layouts), ("b.h.", "bh."))


def backward(
    plan: Plan, res: tuple[Array, Array, Array, Array, Array], do: Array, segments: Segments | None = None
) -> tuple[Array, Array, Array]:
    """dQ, dK, dV of ``plan.backward_backend`` from residuals ``(q, k, v, out, lse)``; ``out``/``lse`` may be the
    final ones of rows that also saw other keys or a sink (context parallelism, sinks). Partitioned as
    ``forward``."""
    options = () if segments is None else tuple(segments)

    def run(local: Plan, q, k, v, out, lse, do, *options):
        local_segments = Segments(*options) if options else None
        if local.backward_backend == "mosaic":
            assert local.logits_soft_cap is None, "the Mosaic kernels take no soft-cap (routed to Triton)"
            return mosaic.backward(local.mask, local.softmax_scale, local.mosaic_config, (q, k, v, out, lse), do,
                                   local_segments)
        return triton.backward(local.mask, local.softmax_scale, local.interpret, local.triton_config,
                               (q, k, v, out, lse), do, local.logits_soft_cap, local_segments)

    layouts = ("b.h.", "b.k.", "b.k.", "b.h.", "bh.", "b.h.") + (_SEGMENT_LAYOUTS if options else ())
    return _partitioned(run, plan, (*res, do, *options), layouts, ("b.h.", "b.k.", "b.k."))


def sinks_gradient(
    sinks: Float[Array, " heads"], out: Array, lse: Float[Array, "batch heads q_len"], do: Array
) -> Float[Array, " heads"]:
    """d loss / d sinks: row ``i`` of head ``h`` gives its sink the weight ``p_i = exp(sink_h - lse_i)`` and
    ``d out_i / d sink_h = -p_i out_i``, so the gradient is ``-sum_i p_i rowsum(dO_i * O_i)``."""
    delta = jnp.einsum("bqhd,bqhd->bhq", do.astype(jnp.float32), out.astype(jnp.float32))
    p_sink = jnp.exp2(sinks.astype(jnp.float32)[None, :, None] * _LOG2E - lse)
    return (-jnp.sum(p_sink * delta, axis=(0, 2))).astype(sinks.dtype)


def _partitioned(run, plan: Plan, arrays: tuple[Array, ...], in_layouts, out_layouts):
    """``run(plan, *arrays)`` on each device's batch rows and heads (``_partitioning``); a mask that differs between
    heads gets the heads of the device's shard."""
    if not _partitioning.wanted():
        return run(plan, *arrays)

    def kernel(*local_arrays, head_shard=None):
        if head_shard is None:  # every head has the same mask: any slice of it is the local one
            return run(_local_plan(plan, local_arrays[0].shape[2]), *local_arrays)
        return _partitioning.per_head_shard(
            lambda mask: run(dataclasses.replace(plan, mask=mask), *local_arrays), plan.mask, *head_shard)

    q, k = arrays[0], arrays[1]
    return _partitioning.partitioned(kernel, in_layouts, out_layouts, group=q.shape[2] // k.shape[2],
                                     head_dependent=plan.mask.differs_between_heads)(*arrays)


def _local_plan(plan: Plan, num_heads: int) -> Plan:
    """``plan`` for a device holding ``num_heads`` query heads of a mask that is the same for every head."""
    return plan if num_heads == plan.mask.num_heads else dataclasses.replace(plan, mask=plan.mask.heads(0, num_heads))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(q, k, v, segments, sinks, plan: Plan, op_name: str):
    return forward(q, k, v, plan, segments, sinks)[0]


def _attention_fwd(q, k, v, segments, sinks, plan: Plan, op_name: str):
    reject_higher_order(op_name, q, k, v)
    out, lse = forward(q, k, v, plan, segments, sinks)
    return out, ((q, k, v, out, lse), segments, sinks)  # O(S) residuals only


def _attention_bwd(plan: Plan, op_name: str, res, do):
    res, segments, sinks = res
    reject_higher_order(op_name, res, do)
    dq, dk, dv = backward(plan, res, do, segments)
    d_segments = None if segments is None else jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), segments)
    d_sinks = None if sinks is None else sinks_gradient(sinks, res[3], res[4], do)
    return dq, dk, dv, d_segments, d_sinks


_attention.defvjp(_attention_fwd, _attention_bwd)


def prepare(q: Array, k: Array, v: Array, plan: Plan) -> tuple[Array, Plan]:
    """Checks shapes, fills missing configs with each backend's default for this shape, and makes the scale positive:
    any finite ``softmax_scale`` is accepted (a negative one flips the sign of ``q``, zero zeroes ``q``, which gives
    the same function and gradients). Returns the ``q`` and ``plan`` the kernels run."""
    _check_shapes(q, k, v, plan.mask)
    if plan.triton_config is None and "triton" in (plan.forward_backend, plan.backward_backend):
        plan = dataclasses.replace(plan, triton_config=triton.config_for(q, k, plan.mask))
    if plan.mosaic_config is None and "mosaic" in (plan.forward_backend, plan.backward_backend):
        plan = dataclasses.replace(plan, mosaic_config=mosaic.default_config(q.shape[3], plan.mask.windows))
    scale = float(plan.softmax_scale)
    if scale <= 0:
        q = q * jnp.asarray(-1 if scale < 0 else 0, q.dtype)
        plan = dataclasses.replace(plan, softmax_scale=-scale if scale < 0 else 1.0)
    return q, plan


def attention(
    q: Float[Array, "batch q_len heads head_dim"],
    k: Float[Array, "batch kv_len kv_heads head_dim"],
    v: Float[Array, "batch kv_len kv_heads head_dim"],
    plan: Plan,
    segments: Segments | None = None,
    sinks: Float[Array, " heads"] | None = None,
    op_name: str = "softmax attention",
) -> Float[Array, "batch q_len heads head_dim"]:
    """Softmax attention under ``plan.mask`` (and ``segments``, with ``sinks``) with ``plan``'s backends (see
    ``prepare``); output in ``q.dtype``. Differentiable in ``q``, ``k``, ``v`` and ``sinks``; ``op_name``: the public
    op, named by the error a second derivative raises."""
    q, plan = prepare(q, k, v, plan)
    # Inside shard_map every kernel input must vary over q's mesh axes (a replicated ``sinks`` then gets its
    # gradient summed over them by the transpose of this cast).
    if segments is not None:
        segments = Segments(*(vary_like(ids, q) for ids in segments))
    if sinks is not None:
        sinks = vary_like(sinks, q)
    return _attention(q, k, v, segments, sinks, plan, op_name)


def softmax_attention(
    q: Float[Array, "batch q_len heads head_dim"],
    k: Float[Array, "batch kv_len kv_heads head_dim"],
    v: Float[Array, "batch kv_len kv_heads head_dim"],
    *,
    windows: tuple[int | None, ...],
    causal: bool,
    softmax_scale: float,
    interpret: bool = False,
    config: triton.KernelConfig | None = None,
) -> Float[Array, "batch q_len heads head_dim"]:
    """The Triton kernels under a ``WindowMask(windows, causal)`` (tests and benchmarks call this directly)."""
    plan = Plan(WindowMask(tuple(windows), bool(causal)), softmax_scale, triton_config=config, interpret=interpret)
    return attention(q, k, v, plan)


def sparse_attention(
    q: Float[Array, "batch q_len heads head_dim"],
    k: Float[Array, "batch kv_len kv_heads head_dim"],
    v: Float[Array, "batch kv_len kv_heads head_dim"],
    *,
    mask: SparseMask,
    softmax_scale: float,
    interpret: bool = False,
    config: triton.KernelConfig | None = None,
) -> Float[Array, "batch q_len heads head_dim"]:
    """The Triton kernels under a ``SparseMask`` (queries are the last ``q_len <= kv_len`` positions)."""
    return attention(q, k, v, Plan(mask, softmax_scale, triton_config=config, interpret=interpret))


def _check_shapes(q: Array, k: Array, v: Array, mask: WindowMask | SparseMask) -> None:
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"incompatible shapes q={q.shape} k={k.shape} v={v.shape}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if heads % kv_heads:
        raise ValueError(f"heads={heads} must be a multiple of kv_heads={kv_heads}")
    if mask.num_heads != heads:
        what = "windows (one per query head)" if isinstance(mask, WindowMask) else "mask.num_heads"
        raise ValueError(f"{what}: the mask has {mask.num_heads} heads, the queries {heads}")
    if isinstance(mask, WindowMask) and any(w is not None and w < 1 for w in mask.windows):
        raise ValueError(f"need one window >= 1 (or None) per query head, got {mask.windows}")
    if (isinstance(mask, SparseMask) or mask.causal) and q_len > kv_len:
        raise ValueError(f"causal and sparse attention need q_len <= kv_len, got {q_len} > {kv_len}")


__all__ = ["BACKENDS", "Plan", "attention", "backward", "forward", "prepare", "softmax_attention", "sparse_attention"]
