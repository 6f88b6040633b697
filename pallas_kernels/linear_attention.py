"""Linear attention (Katharopoulos et al. 2020) with a recurrent state that carries across calls."""

from __future__ import annotations

from jaxtyping import Array, Float

from pallas_kernels import reference
from pallas_kernels._autodiff import forward_mode_guard
from pallas_kernels._dispatch import use_pallas
from pallas_kernels._triton import linear as triton_linear
from pallas_kernels._validation import (
    FEATURE_MAPS,
    check_attention_inputs,
    check_bool,
    check_choice,
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


def linear_attention(
    q: Float[Array, "b s h d"],
    k: Float[Array, "b s kvh d"],
    v: Float[Array, "b s kvh d"],
    feature_map: str = "elu",
    causal: bool = True,
    initial_state: LinearState | None = None,
    *,
    implementation: str = "auto",
    interpret: bool = False,
) -> tuple[Float[Array, "b s h d"], LinearState]:
    """``out_i = phi(q_i) S_i / (phi(q_i) . z_i + 1e-6)`` with ``S_i = S0 + sum_{j<=i} phi(k_j) v_j^T``.

    ``phi`` is ``elu(x)+1``, ``relu(x)`` or a softmax over the head dimension; no softmax scale.
    Non-causal: the sums run over every ``j``. Returns the output and the final state
    ``(S [b, kv_heads, d, d], z [b, kv_heads, d])`` in float32, which continues the sequence when passed
    back as ``initial_state``.
    """
    check_choice("feature_map", feature_map, FEATURE_MAPS)
    check_attention_inputs(q, k, v, causal=False)
    check_bool(causal=causal, interpret=interpret)
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"linear attention needs q_len == kv_len, got {q.shape[1]} and {k.shape[1]}")
    if initial_state is not None:
        initial_state = _check_state(initial_state, q.shape[0], k.shape[2], q.shape[3])
    head_dim = q.shape[3]
    unsupported = kernel_dtype_reason(q, k, v)
    if not (head_dim >= 16 and head_dim & (head_dim - 1) == 0):
        unsupported = f"the kernel's matrix products need a power-of-two head_dim >= 16, got {head_dim}"
    if use_pallas(implementation, "linear_attention", unsupported):
        return forward_mode_guard("linear_attention", (q, k, v, initial_state), lambda: triton_linear.linear_attention(
            q, k, v, feature_map=feature_map, causal=causal, initial_state=initial_state, interpret=interpret))
    return reference.linear_attention(q, k, v, feature_map, causal, initial_state)
