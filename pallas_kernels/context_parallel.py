"""Context parallelism: attention over a sequence sharded in contiguous blocks over a mesh axis, inside ``shard_map``.

Device ``r`` of the ``n`` devices along ``axis_name`` holds positions ``[r L, (r + 1) L)`` of q, k and v (``L`` the
local length). The results equal the unsharded ops, forward and gradients.

- Softmax, causal or full (``context_parallel_attention``): a ring. Keys/values travel to the next device ``n - 1``
  times (``jax.lax.ppermute``); each device merges the partial results of every block it sees through their
  log-sum-exps. The backward runs the same ring with the final output and log-sum-exp, the gradients of each key
  block travelling with it and returning to their owner at the end. Traffic per device: ``(n - 1) / n`` of K/V
  forward, twice that plus dK/dV backward. Layout is contiguous (no zigzag): under ``causal`` device ``r`` computes
  ``r + 1`` blocks, so the last device does the most work (decision: simple layout, no reordering of the user's
  sequence; balance is a later step).
- Softmax with a causal sliding window ``W``: no ring. Each device receives the last ``W - 1`` keys/values before
  its block from the devices before it (one ``ppermute`` when ``W - 1 <= L``) and runs the window kernel over them
  and its own block: ``W - 1`` tokens of K/V per device, whatever ``n``.
- Linear attention (``context_parallel_linear_attention``): each device's state contribution ``phi(K)^T V`` is
  all-gathered (``[kv_heads, d, d]`` per device, not the sequence) and summed over the devices before it; the local
  op then runs from that initial state.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from pallas_kernels import _softmax_kernels, reference
from pallas_kernels._dispatch import choose_backend
from pallas_kernels._vma import vary_like
from pallas_kernels._validation import check_attention_inputs, check_window
from pallas_kernels.linear_attention import linear_attention
from pallas_kernels.masks import WindowMask
from pallas_kernels.reference import FEATURE_MAPS, LinearState
from pallas_kernels.softmax_attention import _backward_backend, _window_kernels, flash_attention


class _BlockKernels(NamedTuple):
    """Forward ``(q, k, v, mask) -> (out, lse)`` and backward ``(mask, (q, k, v, out, lse), do) -> grads`` of one
    (query block, key block) pair, with the kernels' contract (``_softmax_kernels``); ``mask`` is a ``WindowMask``."""

    forward: object
    backward: object


def _block_kernels(q: Array, k: Array, v: Array, softmax_scale: float, implementation: str,
                   interpret: bool) -> tuple[Array, _BlockKernels]:
    """The kernels of one block pair for this call (Pallas backends or the dense XLA path) and the ``q`` they take."""
    mask = WindowMask((None,) * q.shape[2], causal=True)
    backend = choose_backend(implementation, "context_parallel_attention",
                             _window_kernels(q, k, mask, interpret, None))
    if backend == "xla":
        def visible(q_len, kv_len, block_mask):
            q_pos, k_pos = reference.causal_positions(q_len, kv_len)
            return block_mask.visible(q_pos, k_pos)[None]

        return q, _BlockKernels(
            lambda q, k, v, m: reference.softmax_forward_with_lse(q, k, v, visible(q.shape[1], k.shape[1], m),
                                                                  softmax_scale),
            lambda m, res, do: reference.softmax_backward_from_lse(
                *res, do, visible(res[0].shape[1], res[1].shape[1], m), softmax_scale),
        )
    backward = _backward_backend(backend, q, k, mask)
    q, plan = _softmax_kernels.prepare(
        q, k, v, _softmax_kernels.Plan(mask, softmax_scale, backend, backward, interpret=interpret))

    def with_mask(m: WindowMask) -> _softmax_kernels.Plan:
        return _softmax_kernels.Plan(m, plan.softmax_scale, plan.forward_backend, plan.backward_backend,
                                     plan.triton_config, plan.mosaic_config, plan.interpret)

    return q, _BlockKernels(
        lambda q, k, v, m: _softmax_kernels.forward(q, k, v, with_mask(m)),
        lambda m, res, do: _softmax_kernels.backward(with_mask(m), res, do),
    )


def context_parallel_attention(
    q: Float[Array, "b l h d"],
    k: Float[Array, "b l kvh d"],
    v: Float[Array, "b l kvh d"],
    *,
    axis_name: str,
    causal: bool = True,
    window_size: int | None = None,
    softmax_scale: float | None = None,
    implementation: str = "auto",
    interpret: bool = False,
) -> Float[Array, "b l h d"]:
    """``flash_attention`` over the whole sequence, called inside ``shard_map`` on this device's block of it.

    q, k, v hold the same ``L`` positions (self-attention), the ``r``-th block along ``axis_name``. ``window_size``
    needs ``causal=True`` (Mistral's sliding window). ``implementation``/``interpret`` as in ``flash_attention``.
    """
    check_attention_inputs(q, k, v, causal=True)
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"context parallelism shards one sequence: q and k need the same local length, got"
                         f" {q.shape[1]} and {k.shape[1]}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    check_window("window_size", window_size)
    if window_size is not None and not causal:
        raise NotImplementedError("context_parallel_attention takes window_size with causal=True only")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    num_devices = lax.axis_size(axis_name)
    if window_size is not None:
        return _window_attention(q, k, v, axis_name, num_devices, window_size, scale, implementation, interpret)
    q, kernels = _block_kernels(q, k, v, scale, implementation, interpret)
    return _ring_attention(q, k, v, kernels, axis_name, num_devices, causal)


# ---------------------------------------------------------------------------------------------------------------
# Ring (causal or full).


def _next_device(n: int) -> list[tuple[int, int]]:
    return [(i, (i + 1) % n) for i in range(n)]


def _merge(out: Array, lse: Array, block_out: Array, block_lse: Array) -> tuple[Array, Array]:
    """Combines two partial softmax results over disjoint keys (``lse`` base 2, ``-inf`` where no key was seen)."""
    new = jnp.logaddexp2(lse, block_lse)
    weight = lambda x: jnp.where(new == -jnp.inf, 0.0, jnp.exp2(x - new))
    per_row = lambda w: jnp.swapaxes(w, 1, 2)[..., None]  # [b, h, l] -> [b, l, h, 1]
    return out * per_row(weight(lse)) + block_out.astype(jnp.float32) * per_row(weight(block_lse)), new


def _to_merge(lse: Array) -> Array:
    return jnp.where(lse == jnp.inf, -jnp.inf, lse)  # the kernels mark rows without keys +inf (their backward's 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _ring_attention(q, k, v, kernels: _BlockKernels, axis_name: str, num_devices: int, causal: bool):
    return _ring_forward(q, k, v, kernels, axis_name, num_devices, causal)[0]


def _ring_loop(step, carry, axis_name: str, num_devices: int, causal: bool):
    """Ring steps ``t = 1 .. n-1`` as one loop (buffers reused whatever ``n``): ``step(sees, carry)`` after the
    carry's key block moved one device on; ``sees`` says whether this device sees that block (``r - t``)."""
    r = lax.axis_index(axis_name)
    return lax.fori_loop(1, num_devices, lambda t, c: step(r >= t if causal else None, c), carry)


def _ring_forward(q, k, v, kernels, axis_name, num_devices, causal):
    heads = q.shape[2]
    diagonal, full = WindowMask((None,) * heads, causal), WindowMask((None,) * heads, False)
    out, lse = kernels.forward(q, k, v, diagonal)
    out, lse = out.astype(jnp.float32), _to_merge(lse)

    def step(sees, carry):
        kv, out, lse = carry
        kv = lax.ppermute(kv, axis_name, _next_device(num_devices))
        block = lambda kv: kernels.forward(q, *kv, full)
        if sees is None:
            block_out, block_lse = block(kv)
        else:
            nothing = lambda kv: (vary_like(jnp.zeros(q.shape, q.dtype), q),
                                  vary_like(jnp.full(lse.shape, jnp.inf, jnp.float32), q))
            block_out, block_lse = lax.cond(sees, block, nothing, kv)
        return (kv, *_merge(out, lse, block_out, _to_merge(block_lse)))

    _, out, lse = _ring_loop(step, ((k, v), out, lse), axis_name, num_devices, causal)
    out = out.astype(q.dtype)
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)
    return out, (q, k, v, out, lse)


def _ring_backward(kernels, axis_name, num_devices, causal, res, do):
    q, k, v, out, lse = res
    heads = q.shape[2]
    diagonal, full = WindowMask((None,) * heads, causal), WindowMask((None,) * heads, False)
    f32 = lambda *xs: tuple(x.astype(jnp.float32) for x in xs)
    dq, dk, dv = f32(*kernels.backward(diagonal, (q, k, v, out, lse), do))

    def step(sees, carry):
        kv, dq, dk, dv = carry
        kv, dk, dv = lax.ppermute((kv, dk, dv), axis_name, _next_device(num_devices))
        block = lambda kv: f32(*kernels.backward(full, (q, *kv, out, lse), do))
        if sees is None:
            grads = block(kv)
        else:
            zeros = lambda kv: f32(*(vary_like(jnp.zeros_like(x), q) for x in (q, *kv)))
            grads = lax.cond(sees, block, zeros, kv)
        return kv, dq + grads[0], dk + grads[1], dv + grads[2]

    _, dq, dk, dv = _ring_loop(step, ((k, v), dq, dk, dv), axis_name, num_devices, causal)
    # After n - 1 hops each key block's gradients sit one device before their owner.
    if num_devices > 1:
        dk, dv = lax.ppermute((dk, dv), axis_name, _next_device(num_devices))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_ring_attention.defvjp(_ring_forward, _ring_backward)


# ---------------------------------------------------------------------------------------------------------------
# Causal sliding window: the W - 1 keys before the block come from the devices before it.


def _window_attention(q, k, v, axis_name, num_devices, window, scale, implementation, interpret):
    block_len, reach = q.shape[1], window - 1
    if reach == 0 or num_devices == 1:
        return flash_attention(q, k, v, window_size=window, softmax_scale=scale, implementation=implementation,
                               interpret=interpret)
    hops = -(-reach // block_len)  # devices back that hold a visible key
    r = lax.axis_index(axis_name)
    # Piece j (j = hops..1) comes from device r - j: whole blocks, but only the needed tail of the farthest one.
    pieces = []
    for j in range(hops, 0, -1):
        keep = reach - (hops - 1) * block_len if j == hops else block_len
        shift = [(i, (i + j) % num_devices) for i in range(num_devices)]
        pieces.append(lax.ppermute((k[:, -keep:], v[:, -keep:]), axis_name, shift))
    k_ext = jnp.concatenate([p[0] for p in pieces] + [k], axis=1)
    v_ext = jnp.concatenate([p[1] for p in pieces] + [v], axis=1)

    def attend(valid_before: int):
        """Queries are the last positions of the keys: the block and the ``valid_before`` keys before it."""
        start = k_ext.shape[1] - block_len - valid_before
        return lambda: flash_attention(q, k_ext[:, start:], v_ext[:, start:], window_size=window,
                                       softmax_scale=scale, implementation=implementation, interpret=interpret)

    # Device r < hops has only r blocks before it (device 0 none): the wrapped-around keys must stay unseen.
    branches = [attend(min(j * block_len, reach)) for j in range(hops)] + [attend(reach)]
    return lax.switch(jnp.minimum(r, hops), branches)


# ---------------------------------------------------------------------------------------------------------------
# Linear attention: prefix of the per-device states.


def context_parallel_linear_attention(
    q: Float[Array, "b l h d"],
    k: Float[Array, "b l kvh d"],
    v: Float[Array, "b l kvh d"],
    feature_map: str = "elu",
    causal: bool = True,
    *,
    axis_name: str,
    implementation: str = "auto",
    interpret: bool = False,
) -> tuple[Float[Array, "b l h d"], LinearState]:
    """``linear_attention`` over the whole sequence, inside ``shard_map`` on this device's block of it.

    Returns this block's output and the state after the whole sequence (the same on every device).
    """
    check_attention_inputs(q, k, v, causal=False)
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {tuple(FEATURE_MAPS)}, got {feature_map!r}")
    phi = FEATURE_MAPS[feature_map]
    fk = phi(k.astype(jnp.float32))
    block_state = LinearState(jnp.einsum("bshd,bshe->bhde", fk, v.astype(jnp.float32)), jnp.sum(fk, axis=1))
    states = lax.all_gather(block_state, axis_name)  # [n, ...] each
    r = lax.axis_index(axis_name)
    if causal:
        before = jnp.arange(lax.axis_size(axis_name)) < r
        initial = jax.tree.map(lambda s: jnp.tensordot(before.astype(s.dtype), s, axes=1), states)
    else:
        initial = jax.tree.map(lambda s, own: jnp.sum(s, axis=0) - own, states, block_state)  # every other block
    out, _ = linear_attention(q, k, v, feature_map, causal, LinearState(*initial), implementation=implementation,
                              interpret=interpret)
    return out, LinearState(*lax.psum(block_state, axis_name))


__all__ = ["context_parallel_attention", "context_parallel_linear_attention"]
