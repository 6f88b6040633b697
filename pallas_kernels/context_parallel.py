"""Context parallelism: attention over a sequence sharded over a mesh axis, inside ``shard_map``.

Layouts (``layout=`` of ``context_parallel_attention``; ``n`` devices along ``axis_name``, ``L`` the local length):

- ``"contiguous"`` (the default, and the only layout of the other ops): device ``r`` holds positions
  ``[r L, (r + 1) L)`` of q, k and v, the sequence as the user's ``shard_map`` splits it.
- ``"zigzag"`` (causal ring attention): the sequence is cut into ``2n`` chunks of ``L / 2`` positions and device ``r``
  holds chunks ``r`` and ``2n - 1 - r``, in that order along its local sequence axis (``L`` must be even). With
  ``n = 4``: device 0 holds chunks 0 and 7, device 1 chunks 1 and 6, device 2 chunks 2 and 5, device 3 chunks 3 and 4.
  ``to_zigzag(x, n)`` puts a whole (unsharded) array in this order before it is sharded, ``from_zigzag(out, n)``
  puts the gathered result back, and ``zigzag_order(seq_len, n)`` gives the global position of each slot (for
  position-dependent inputs such as rotary embeddings, which must use those positions).

The results equal the unsharded ops, forward and gradients (in the zigzag layout: of the reordered sequence).

- Softmax, causal or full (``context_parallel_attention``): a ring. Keys/values travel to the next device ``n - 1``
  times (``jax.lax.ppermute``); each device merges the partial results of every block it sees through their
  log-sum-exps. The backward runs the same ring with the final output and log-sum-exp, the gradients of each key
  block travelling with it and returning to their owner at the end. Traffic per device: ``(n - 1) / n`` of K/V
  forward, twice that plus dK/dV backward, in either layout.
  Work per device under ``causal`` (in units of one ``L x L`` block product, the diagonal block counting 1/2):
  contiguous, device ``r`` computes its diagonal block and the ``r`` whole blocks before it, ``r + 1/2``: the last
  device does ``n - 1/2``, about twice the mean, and the ring runs at the pace of the last device. Zigzag, every
  device does the same at every step: its own (diagonal) block, whose local causal mask is the global one (chunk
  ``r`` comes before chunk ``2n - 1 - r``), then for the block of device ``s`` received at each step either both its
  query chunks against the key chunk ``s`` (when ``s < r``: chunk ``s`` comes before both, chunk ``2n - 1 - s``
  after both) or its second query chunk against both key chunks (``s > r``: both come before chunk ``2n - 1 - r``,
  neither before chunk ``r``), half a block; ``1/2 + (n - 1) / 2 = n / 2`` per device, the mean. Full attention
  (``causal=False``) takes either layout: every device computes every block, the zigzag layout is only a
  permutation of the sequence.
- Softmax with a causal sliding window ``W``: no ring, contiguous layout only (it is already balanced: every device
  attends to ``W - 1 + L`` keys). Each device receives the last ``W - 1`` keys/values before its block from the
  devices before it (one ``ppermute`` when ``W - 1 <= L``) and runs the window kernel over them and its own block:
  ``W - 1`` tokens of K/V per device, whatever ``n``.
- Linear attention (``context_parallel_linear_attention``): each device's state contribution ``phi(K)^T V`` is
  all-gathered (``[kv_heads, d, d]`` per device, not the sequence) and summed over the devices before it; the local
  op then runs from that initial state.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float

from pallas_kernels import _softmax_kernels, reference
from pallas_kernels._dispatch import choose_backend
from pallas_kernels._validation import (
    check_attention_inputs,
    check_choice,
    check_positive,
    check_window,
    static_int,
)
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

    return q, _BlockKernels(
        lambda q, k, v, m: _softmax_kernels.forward(q, k, v, dataclasses.replace(plan, mask=m)),
        lambda m, res, do: _softmax_kernels.backward(dataclasses.replace(plan, mask=m), res, do),
    )


LAYOUTS = ("contiguous", "zigzag")


def context_parallel_attention(
    q: Float[Array, "b l h d"],
    k: Float[Array, "b l kvh d"],
    v: Float[Array, "b l kvh d"],
    *,
    axis_name: str,
    causal: bool = True,
    window_size: int | None = None,
    softmax_scale: float | None = None,
    layout: str = "contiguous",
    implementation: str = "auto",
    interpret: bool = False,
) -> Float[Array, "b l h d"]:
    """``flash_attention`` over the whole sequence, called inside ``shard_map`` on this device's part of it.

    q, k, v hold the same ``L`` positions (self-attention). ``layout``: which positions each device holds (module
    docstring). ``"contiguous"``: the ``r``-th block along ``axis_name``; under ``causal`` device ``r`` computes
    ``r + 1/2`` blocks, so the last one sets the pace. ``"zigzag"``: chunks ``r`` and ``2n - 1 - r`` of ``2n`` (``L``
    even; ``to_zigzag``/``from_zigzag`` reorder the whole arrays), every device doing the same work, ``n / 2`` blocks.
    Full attention takes either layout (results are the same up to the reordering); ``window_size`` takes the
    contiguous one only (a ``ValueError`` otherwise: the window's work is balanced already). ``window_size`` needs
    ``causal=True`` (Mistral's sliding window). ``implementation``/``interpret`` as in ``flash_attention``.
    """
    check_attention_inputs(q, k, v, causal=True)
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"context parallelism shards one sequence: q and k need the same local length, got"
                         f" {q.shape[1]} and {k.shape[1]}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    check_window("window_size", window_size)
    check_choice("layout", layout, LAYOUTS)
    if window_size is not None and not causal:
        raise NotImplementedError("context_parallel_attention takes window_size with causal=True only")
    if layout == "zigzag":
        if window_size is not None:
            raise ValueError(f"layout='zigzag' balances the causal ring; window_size={window_size} runs no ring and"
                             f" is balanced in the contiguous layout: use layout='contiguous'")
        if q.shape[1] % 2:
            raise ValueError(f"layout='zigzag' holds two chunks of L / 2 positions per device: the local length L"
                             f" must be even, got {q.shape[1]}")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    num_devices = lax.axis_size(axis_name)
    if window_size is not None:
        return _window_attention(q, k, v, axis_name, num_devices, window_size, scale, implementation, interpret)
    q, kernels = _block_kernels(q, k, v, scale, implementation, interpret)
    return _ring_attention(q, k, v, kernels, axis_name, num_devices, _schedule(layout, causal, q.shape[1]))


# ---------------------------------------------------------------------------------------------------------------
# Zigzag layout of a whole sequence.


def zigzag_order(seq_len: int, num_devices: int) -> np.ndarray:
    """The zigzag layout as indices: ``x[order]`` (along the sequence) is ``x`` in zigzag order, and ``order[i]`` is
    the global position of slot ``i``. Device ``r`` of ``num_devices`` gets slots ``[r L, (r + 1) L)``
    (``L = seq_len / num_devices``): chunks ``r`` and ``2 num_devices - 1 - r`` of ``L / 2`` positions."""
    check_positive(seq_len=seq_len, num_devices=num_devices)
    if seq_len % (2 * num_devices):
        raise ValueError(f"the zigzag layout cuts the sequence into 2 * num_devices = {2 * num_devices} chunks:"
                         f" seq_len must be a multiple of it, got seq_len={seq_len}")
    chunks = np.arange(seq_len).reshape(2 * num_devices, -1)
    return np.concatenate([chunks[[r, 2 * num_devices - 1 - r]] for r in range(num_devices)]).reshape(-1)


def _reorder(x, num_devices: int, axis: int, inverse: bool):
    axis = static_int("axis", axis)
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis must be in [{-x.ndim}, {x.ndim}) for an array of {x.ndim} dimensions, got {axis}")
    order = zigzag_order(x.shape[axis], num_devices)
    return (np if isinstance(x, np.ndarray) else jnp).take(x, np.argsort(order) if inverse else order, axis=axis)


def to_zigzag(x, num_devices: int, axis: int = 1):
    """The whole (unsharded) ``x`` with its sequence axis ``axis`` in zigzag order for ``num_devices`` devices: shard
    the result in contiguous blocks and call ``context_parallel_attention(..., layout="zigzag")``. NumPy arrays stay
    NumPy (for data pipelines); differentiable."""
    return _reorder(x, num_devices, axis, inverse=False)


def from_zigzag(x, num_devices: int, axis: int = 1):
    """The inverse of ``to_zigzag``: the sequence axis of the gathered result back in order."""
    return _reorder(x, num_devices, axis, inverse=True)


# ---------------------------------------------------------------------------------------------------------------
# Ring (causal or full).


class _Pair(NamedTuple):
    """Rows ``[start, stop)`` of this device's queries and of a received key block, every key visible to every query."""

    queries: tuple[int, int]
    keys: tuple[int, int]


class _Schedule(NamedTuple):
    """What a device computes in the ring: its own block under a causal or full mask, then with each received block
    ``earlier`` if the block's owner comes before this device on the axis, else ``later`` (``None``: nothing)."""

    causal: bool
    earlier: _Pair | None
    later: _Pair | None


def _schedule(layout: str, causal: bool, length: int) -> _Schedule:
    whole, half = (0, length), length // 2
    if not causal:
        return _Schedule(False, _Pair(whole, whole), _Pair(whole, whole))
    if layout == "contiguous":
        return _Schedule(True, _Pair(whole, whole), None)
    # Zigzag (module docstring): chunk s of an earlier device s precedes both of ours, its chunk 2n - 1 - s follows
    # both; both chunks of a later device precede our second chunk and follow our first.
    return _Schedule(True, _Pair(whole, (0, half)), _Pair((half, length), whole))


def _rows(x: Array, rows: tuple[int, int], axis: int = 1) -> Array:
    return x if rows == (0, x.shape[axis]) else lax.slice_in_dim(x, *rows, axis=axis)


def _update_rows(x: Array, rows: tuple[int, int], update, axis: int = 1) -> Array:
    """``x`` with rows ``rows`` along ``axis`` replaced by ``update(those rows)``."""
    if rows == (0, x.shape[axis]):
        return update(x)
    return lax.dynamic_update_slice_in_dim(x, update(_rows(x, rows, axis)), rows[0], axis)


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
def _ring_attention(q, k, v, kernels: _BlockKernels, axis_name: str, num_devices: int, schedule: _Schedule):
    return _ring_forward(q, k, v, kernels, axis_name, num_devices, schedule)[0]


def _ring_loop(move, add_pair, carry, axis_name: str, num_devices: int, schedule: _Schedule):
    """Ring steps ``t = 1 .. n-1`` as one loop (buffers reused whatever ``n``): ``move(carry)`` passes the carry's key
    block one device on, then ``add_pair(pair, carry)`` adds its products over ``pair`` (``schedule``'s, from the
    block's owner ``r - t mod n``, which comes before this device ``r`` iff ``t <= r``)."""
    r = lax.axis_index(axis_name)
    earlier, later = (functools.partial(add_pair, pair) if pair else (lambda c: c)
                      for pair in (schedule.earlier, schedule.later))

    def step(t, carry):
        carry = move(carry)
        if schedule.earlier == schedule.later:
            return earlier(carry)
        return lax.cond(t <= r, earlier, later, carry)

    return lax.fori_loop(1, num_devices, step, carry)


def _ring_forward(q, k, v, kernels, axis_name, num_devices, schedule):
    heads = q.shape[2]
    diagonal, full = WindowMask((None,) * heads, schedule.causal), WindowMask((None,) * heads, False)
    out, lse = kernels.forward(q, k, v, diagonal)
    out, lse = out.astype(jnp.float32), _to_merge(lse)

    def move(carry):
        kv, out, lse = carry
        return lax.ppermute(kv, axis_name, _next_device(num_devices)), out, lse

    def add_pair(pair, carry):
        (k, v), out, lse = carry
        block_out, block_lse = kernels.forward(_rows(q, pair.queries), _rows(k, pair.keys), _rows(v, pair.keys), full)
        out_rows, lse_rows = _merge(_rows(out, pair.queries), _rows(lse, pair.queries, 2), block_out,
                                    _to_merge(block_lse))
        return ((k, v), _update_rows(out, pair.queries, lambda _: out_rows),
                _update_rows(lse, pair.queries, lambda _: lse_rows, 2))

    _, out, lse = _ring_loop(move, add_pair, ((k, v), out, lse), axis_name, num_devices, schedule)
    out = out.astype(q.dtype)
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)
    return out, (q, k, v, out, lse)


def _ring_backward(kernels, axis_name, num_devices, schedule, res, do):
    q, k, v, out, lse = res
    heads = q.shape[2]
    diagonal, full = WindowMask((None,) * heads, schedule.causal), WindowMask((None,) * heads, False)
    f32 = lambda *xs: tuple(x.astype(jnp.float32) for x in xs)
    dq, dk, dv = f32(*kernels.backward(diagonal, (q, k, v, out, lse), do))

    def move(carry):
        kv, dq, dk, dv = carry
        kv, dk, dv = lax.ppermute((kv, dk, dv), axis_name, _next_device(num_devices))
        return kv, dq, dk, dv

    def add_pair(pair, carry):
        (k, v), dq, dk, dv = carry
        rows = lambda x, axis=1: _rows(x, pair.queries, axis)
        grads = f32(*kernels.backward(full, (rows(q), _rows(k, pair.keys), _rows(v, pair.keys), rows(out),
                                             rows(lse, 2)), rows(do)))
        add = lambda acc, span, grad: _update_rows(acc, span, lambda x: x + grad)
        return (k, v), add(dq, pair.queries, grads[0]), add(dk, pair.keys, grads[1]), add(dv, pair.keys, grads[2])

    _, dq, dk, dv = _ring_loop(move, add_pair, ((k, v), dq, dk, dv), axis_name, num_devices, schedule)
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


__all__ = [
    "context_parallel_attention",
    "context_parallel_linear_attention",
    "from_zigzag",
    "to_zigzag",
    "zigzag_order",
]
