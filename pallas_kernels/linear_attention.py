"""Linear attention (Katharopoulos et al. 2020) with a recurrent state that carries across calls."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from pallas_kernels import reference
from pallas_kernels._autodiff import forward_mode_guard
from pallas_kernels._dispatch import use_pallas
from pallas_kernels._triton import linear as triton_linear
from pallas_kernels._validation import (
    FEATURE_MAPS,
    check_attention_inputs,
    check_bool,
    check_choice,
    check_segment_ids,
    check_seq_lengths,
    kernel_dtype_reason,
)
from pallas_kernels.reference import LinearState


def _check_state(state: LinearState, batch: int, num_kv_heads: int, head_dim: int) -> LinearState:
    if not isinstance(state, tuple) or len(state) != 2:
        raise TypeError(f"initial_state must be a LinearState (kv, k_sum) pair, got {type(state).__name__}")
    kv, k_sum = state
    if kv.shape != (batch, num_kv_heads, head_dim, head_dim) or k_sum.shape != (batch, num_kv_heads, head_dim):
        raise ValueError(
            f"initial_state must hold kv [{batch}, {num_kv_heads}, {head_dim}, {head_dim}] and k_sum"
            f" [{batch}, {num_kv_heads}, {head_dim}], got {kv.shape} and {k_sum.shape}"
        )
    return LinearState(kv, k_sum)


def _seq_lengths(name: str, lengths, batch: int, seq_len: int) -> Array | None:
    return None if lengths is None else check_seq_lengths(name, lengths, batch, seq_len)


def _linear_segment_ids(q_segment_ids, kv_segment_ids, batch: int, seq_len: int) -> Array | None:
    """The one segment-id array of linear attention (queries and keys are the same positions): ``q_segment_ids``,
    else ``kv_segment_ids``; given both, they must be equal (compared where both are concrete)."""
    check = lambda name, ids: None if ids is None else check_segment_ids(name, ids, batch, seq_len)
    q_ids, kv_ids = check("q_segment_ids", q_segment_ids), check("kv_segment_ids", kv_segment_ids)
    if q_ids is None or kv_ids is None or q_ids is kv_ids:
        return kv_ids if q_ids is None else q_ids
    if not isinstance(q_ids, jax.core.Tracer) and not isinstance(kv_ids, jax.core.Tracer):
        if not np.array_equal(np.asarray(q_ids), np.asarray(kv_ids)):
            raise ValueError(
                "linear attention has one sequence: kv_segment_ids must equal q_segment_ids (or be left None), got"
                f" q_segment_ids {np.asarray(q_ids).tolist()} and kv_segment_ids {np.asarray(kv_ids).tolist()}"
            )
    return q_ids


def linear_attention(
    q: Float[Array, "b s h d"],
    k: Float[Array, "b s kvh d"],
    v: Float[Array, "b s kvh d"],
    feature_map: str = "elu",
    causal: bool = True,
    initial_state: LinearState | None = None,
    *,
    q_segment_ids: Int[Array, "b s"] | None = None,
    kv_segment_ids: Int[Array, "b s"] | None = None,
    query_seq_lengths: Int[Array, " b"] | None = None,
    key_value_seq_lengths: Int[Array, " b"] | None = None,
    implementation: str = "auto",
    interpret: bool = False,
) -> tuple[Float[Array, "b s h d"], LinearState]:
    """``out_i = phi(q_i) S_i / (phi(q_i) . z_i + 1e-6)`` with ``S_i = S0 + sum_{j<=i} phi(k_j) v_j^T``.

    ``phi`` is ``elu(x)+1``, ``relu(x)`` or a softmax over the head dimension; no softmax scale.
    Non-causal: the sums run over every ``j``. Returns the output and the final state
    ``(S [b, kv_heads, d, d], z [b, kv_heads, d])`` in float32, which continues the sequence when passed
    back as ``initial_state``.

    Packed sequences and padding (both paths; XLA and the Pallas kernels compute the same function):

    - ``q_segment_ids`` int ``[b, s]`` (``kv_segment_ids``, the same positions, defaults to it and must equal it if
      both are given): query i reads key j only if both lie in the same segment, a contiguous run of equal ids (an
      id that comes back after another one starts a NEW segment). The state restarts from zero at each segment
      start, so a packed row computes what each segment computes alone; ``initial_state`` belongs to each row's
      FIRST segment only (the one that continues the earlier sequence). Non-causal: each query sums over its whole
      segment (both directions).
    - ``query_seq_lengths`` / ``key_value_seq_lengths`` int ``[b]``, in ``[0, s]``: keys at ``j >=
      key_value_seq_lengths[b]`` count nowhere (nor do they start a segment); queries at ``i >=
      query_seq_lengths[b]`` output zeros and pass zero gradient.
    - The returned state is that of the segment open at each row's last valid key (``initial_state`` itself when
      the row has no valid key), i.e. after its last valid token: passed back as ``initial_state`` it continues
      that segment.
    """
    check_choice("feature_map", feature_map, FEATURE_MAPS)
    check_attention_inputs(q, k, v, causal=False)
    check_bool(causal=causal, interpret=interpret)
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"linear attention needs q_len == kv_len, got {q.shape[1]} and {k.shape[1]}")
    if initial_state is not None:
        initial_state = _check_state(initial_state, q.shape[0], k.shape[2], q.shape[3])
    batch, seq_len, _, head_dim = q.shape
    packing = dict(
        segment_ids=_linear_segment_ids(q_segment_ids, kv_segment_ids, batch, seq_len),
        query_lengths=_seq_lengths("query_seq_lengths", query_seq_lengths, batch, seq_len),
        kv_lengths=_seq_lengths("key_value_seq_lengths", key_value_seq_lengths, batch, seq_len),
    )
    unsupported = kernel_dtype_reason(q, k, v)
    if not (head_dim >= 16 and head_dim & (head_dim - 1) == 0):
        unsupported = f"the kernel's matrix products need a power-of-two head_dim >= 16, got {head_dim}"
    if use_pallas(implementation, "linear_attention", unsupported):
        return forward_mode_guard("linear_attention", (q, k, v, initial_state), lambda: triton_linear.linear_attention(
            q, k, v, feature_map=feature_map, causal=causal, initial_state=initial_state, interpret=interpret,
            **packing))
    return reference.linear_attention(q, k, v, feature_map, causal, initial_state, **packing)
