"""The backend seam of the softmax family: one ``custom_vjp`` over either Pallas backend's kernels.

Both backends (``_triton/softmax.py``: any GPU, every mask; ``_mosaic/softmax.py``: Hopper+, window masks) expose
the same two entry points for the same mask description (``masks.WindowMask`` / ``masks.SparseMask``, GQA by head
ratio, queries the last positions of the keys):

- ``forward(q, k, v, mask, softmax_scale, ...) -> (out, lse)``, ``lse`` the base-2 log-sum-exp ``[batch, heads,
  q_len]``, ``+inf`` on rows that see no key;
- ``backward(mask, softmax_scale, ..., (q, k, v, out, lse), d_out) -> (dq, dk, dv)``.

The residuals are the same for both, so a forward of one backend can be differentiated by the other's backward
(the Mosaic forward at head_dim 256 uses the Triton backward, whose tiles fit in shared memory).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from pallas_kernels._autodiff import reject_higher_order
from pallas_kernels import _partitioning
from pallas_kernels._mosaic import softmax as mosaic
from pallas_kernels._triton import softmax as triton
from pallas_kernels.masks import SparseMask, WindowMask

BACKENDS = ("mosaic", "triton")
# The public ops served by this seam, named in the errors of the derivatives it does not define.
_OPS = "flash_attention / multiscale_attention / sparse_attention"


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

    def __post_init__(self):
        for name in ("forward_backend", "backward_backend"):
            if getattr(self, name) not in BACKENDS:
                raise ValueError(f"{name} must be one of {BACKENDS}, got {getattr(self, name)!r}")


def forward(q: Array, k: Array, v: Array, plan: Plan) -> tuple[Array, Array]:
    """Output and base-2 log-sum-exp of ``plan.forward_backend`` (``plan`` as returned by ``prepare``); under ``jit``
    with inputs sharded over batch/heads each device runs its own shard (``_partitioning``)."""

    def run(local: Plan, q, k, v):
        if local.forward_backend == "mosaic":
            return mosaic.forward(q, k, v, local.mask, local.softmax_scale, local.mosaic_config)
        return triton.forward(q, k, v, local.mask, local.softmax_scale, local.interpret, local.triton_config)

    return _partitioned(run, plan, (q, k, v), ("b.h.", "b.k.", "b.k."), ("b.h.", "bh."))


def backward(plan: Plan, res: tuple[Array, Array, Array, Array, Array], do: Array) -> tuple[Array, Array, Array]:
    """dQ, dK, dV of ``plan.backward_backend`` from residuals ``(q, k, v, out, lse)``; ``out``/``lse`` may be the
    final ones of rows that also saw other keys (context parallelism). Partitioned as ``forward``."""

    def run(local: Plan, q, k, v, out, lse, do):
        if local.backward_backend == "mosaic":
            return mosaic.backward(local.mask, local.softmax_scale, local.mosaic_config, (q, k, v, out, lse), do)
        return triton.backward(local.mask, local.softmax_scale, local.interpret, local.triton_config,
                               (q, k, v, out, lse), do)

    layouts = ("b.h.", "b.k.", "b.k.", "b.h.", "bh.", "b.h.")
    return _partitioned(run, plan, (*res, do), layouts, ("b.h.", "b.k.", "b.k."))


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
                                     head_dependent=_head_dependent(plan.mask))(*arrays)


def _head_dependent(mask: WindowMask | SparseMask) -> bool:
    """Whether the mask differs between heads (multi-scale windows, sparse random blocks)."""
    if isinstance(mask, SparseMask):
        return mask.num_random_blocks > 0
    return len(set(mask.windows)) > 1


def _local_plan(plan: Plan, num_heads: int) -> Plan:
    """``plan`` for a device holding ``num_heads`` query heads of a mask that is the same for every head."""
    return plan if num_heads == plan.mask.num_heads else dataclasses.replace(plan, mask=plan.mask.heads(0, num_heads))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, plan: Plan):
    return forward(q, k, v, plan)[0]


def _attention_fwd(q, k, v, plan: Plan):
    reject_higher_order(_OPS, q, k, v)
    out, lse = forward(q, k, v, plan)
    return out, (q, k, v, out, lse)  # O(S) residuals only


def _attention_bwd(plan: Plan, res, do):
    reject_higher_order(_OPS, res, do)
    return backward(plan, res, do)


_attention.defvjp(_attention_fwd, _attention_bwd)


def prepare(q: Array, k: Array, v: Array, plan: Plan) -> tuple[Array, Plan]:
    """Checks shapes, fills missing configs with each backend's default for this shape, and makes the scale positive:
    any finite ``softmax_scale`` is accepted (a negative one flips the sign of ``q``, zero zeroes ``q``, which gives
    the same function and gradients). Returns the ``q`` and ``plan`` the kernels run."""
    _check_shapes(q, k, v, plan.mask)
    if plan.triton_config is None and "triton" in (plan.forward_backend, plan.backward_backend):
        plan = dataclasses.replace(plan, triton_config=triton.config_for(q, k, plan.mask))
    if plan.mosaic_config is None and "mosaic" in (plan.forward_backend, plan.backward_backend):
        plan = dataclasses.replace(plan, mosaic_config=mosaic.default_config(q.shape[3]))
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
) -> Float[Array, "batch q_len heads head_dim"]:
    """Softmax attention under ``plan.mask`` with ``plan``'s backends (see ``prepare``); output in ``q.dtype``.
    Differentiable."""
    q, plan = prepare(q, k, v, plan)
    return _attention(q, k, v, plan)


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
