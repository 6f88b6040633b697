"""Pure-JAX (XLA) attention: the ``implementation="xla"`` path and the reference the kernels are tested against.

Exact and readable rather than fast: softmax forms build the dense mask of ``masks.py`` over absolute
positions and run one masked softmax; linear attention runs a chunked scan (O(S) memory).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from pallas_kernels._vma import vary_like

_LOG2E = 1.4426950408889634

LINEAR_EPS = 1e-6


def softmax_attention(
    q: Float[Array, "b sq h d"],
    k: Float[Array, "b sk kvh d"],
    v: Float[Array, "b sk kvh d"],
    visible: Bool[Array, "#b h sq sk"],
    softmax_scale: float,
    logits_soft_cap: float | None = None,
    sinks: Float[Array, "h"] | None = None,
) -> Float[Array, "b sq h d"]:
    """Softmax attention under an explicit mask; query head ``h`` reads key/value head ``h // group``.

    ``logits_soft_cap``: scaled scores become ``cap * tanh(s / cap)`` before masking. ``sinks``: one logit per query
    head for a key every query sees, with value zero (it only adds ``e^{sink}`` to each row's normaliser).
    Rows with no visible key output zeros. Keys/values that no query of their (batch row, KV head) sees (empty
    cache slots, positions outside every window) are replaced by zeros first, so whatever they hold (NaN, Inf)
    reaches no output and no gradient; scores are masked with ``where``, so a non-finite key reaches no query that
    does not see it.
    """
    return softmax_forward_with_lse(q, k, v, visible, softmax_scale, logits_soft_cap, sinks)[0]


def softmax_forward_with_lse(
    q: Float[Array, "b sq h d"],
    k: Float[Array, "b sk kvh d"],
    v: Float[Array, "b sk kvh d"],
    visible: Bool[Array, "#b h sq sk"],
    softmax_scale: float,
    logits_soft_cap: float | None = None,
    sinks: Float[Array, "h"] | None = None,
) -> tuple[Float[Array, "b sq h d"], Float[Array, "b h sq"]]:
    """``softmax_attention`` and the base-2 log-sum-exp ``[b, h, sq]`` (``+inf`` on rows that see no key and no
    sink): the kernels' forward contract, densely (the XLA backend of ``context_parallel_attention``)."""
    b, sq, h, d = q.shape
    sk, kvh = k.shape[1], k.shape[2]
    acc = _accumulation_dtype(q.dtype)
    mask = visible.reshape(visible.shape[0], kvh, h // kvh, sq, sk)
    seen = jnp.any(mask, axis=(2, 3)).transpose(0, 2, 1)[..., None]  # [#b, sk, kvh, 1]
    k, v = jnp.where(seen, k, 0), jnp.where(seen, v, 0)
    logits = _grouped_logits(q, k, acc) * softmax_scale
    if logits_soft_cap is not None:
        logits = logits_soft_cap * jnp.tanh(logits / logits_soft_cap)
    logits = jnp.where(mask, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    if sinks is not None:
        sink = sinks.astype(acc).reshape(1, kvh, h // kvh, 1, 1)
        row_max = jnp.maximum(row_max, sink)
    # The result does not depend on the subtracted maximum, so it takes no gradient.
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    weights = jnp.exp(logits - row_max)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    if sinks is not None:
        total = total + jnp.exp(sink - row_max)
    total_or_one = jnp.where(total == 0, 1.0, total)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", weights / total_or_one, v.astype(acc))
    lse = jnp.where(total == 0, jnp.inf, (row_max + jnp.log(total_or_one)) * _LOG2E)
    return out.reshape(b, sq, h, d).astype(q.dtype), lse.reshape(b, h, sq)


def softmax_backward_from_lse(
    q: Float[Array, "b sq h d"],
    k: Float[Array, "b sk kvh d"],
    v: Float[Array, "b sk kvh d"],
    out: Float[Array, "b sq h d"],
    lse: Float[Array, "b h sq"],
    d_out: Float[Array, "b sq h d"],
    visible: Bool[Array, "#b h sq sk"],
    softmax_scale: float,
) -> tuple[Array, Array, Array]:
    """dQ, dK, dV of the keys ``k``/``v`` given the FINAL ``out`` and base-2 ``lse`` of each query row, which may have
    seen other keys too (the kernels' backward contract, densely): ``p = exp2(log2(e) s - lse)``,
    ``dS = p (dO V^T - rowsum(dO * O))``."""
    b, sq, h, d = q.shape
    sk, kvh = k.shape[1], k.shape[2]
    group = h // kvh
    acc = _accumulation_dtype(q.dtype)
    logits = _grouped_logits(q, k, acc) * (softmax_scale * _LOG2E)
    logits = jnp.where(visible.reshape(visible.shape[0], kvh, group, sq, sk), logits, -jnp.inf)
    p = jnp.exp2(logits - lse.reshape(b, kvh, group, sq)[..., None])
    do = d_out.astype(acc).reshape(b, sq, kvh, group, d)
    delta = jnp.einsum("bqhgd,bqhgd->bhgq", do, out.astype(acc).reshape(b, sq, kvh, group, d))
    ds = p * (jnp.einsum("bqhgd,bkhd->bhgqk", do, v.astype(acc)) - delta[..., None])
    dq = jnp.einsum("bhgqk,bkhd->bqhgd", ds, k.astype(acc)).reshape(q.shape) * softmax_scale
    dk = jnp.einsum("bhgqk,bqhgd->bkhd", ds, q.astype(acc).reshape(b, sq, kvh, group, d)) * softmax_scale
    dv = jnp.einsum("bhgqk,bqhgd->bkhd", p, do)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _grouped_logits(q: Array, k: Array, acc) -> Float[Array, "b kvh g sq sk"]:
    b, sq, h, d = q.shape
    kvh = k.shape[2]
    q_grouped = q.reshape(b, sq, kvh, h // kvh, d)
    return jnp.einsum("bqhgd,bkhd->bhgqk", q_grouped, k, preferred_element_type=acc)


def _accumulation_dtype(dtype) -> jnp.dtype:
    """float32 for low-precision inputs, float64 where the inputs are float64 (gradient checks)."""
    return jnp.promote_types(dtype, jnp.float32)


def causal_positions(q_len: int, kv_len: int) -> tuple[Int[Array, "sq"], Int[Array, "sk"]]:
    """Absolute positions when the queries are the last ``q_len`` positions of ``kv_len`` keys (with more queries
    than keys, non-causal, the first queries sit at negative positions)."""
    k_pos = jnp.arange(kv_len, dtype=jnp.int32)
    return jnp.arange(q_len, dtype=jnp.int32) + (kv_len - q_len), k_pos


def cache_positions(
    lengths: Int[Array, "b"], q_len: int, capacity: int
) -> tuple[Int[Array, "b t"], Int[Array, "b L"]]:
    """Positions for a linear cache whose first ``lengths[b]`` slots are filled, the last ``q_len`` of them new.

    Empty slots get position -1 (never visible).
    """
    lengths = jnp.asarray(lengths, jnp.int32)
    q_pos = lengths[:, None] - q_len + jnp.arange(q_len, dtype=jnp.int32)
    slots = jnp.arange(capacity, dtype=jnp.int32)[None, :]
    k_pos = jnp.where(slots < lengths[:, None], slots, -1)
    return q_pos, k_pos


class LinearState(NamedTuple):
    """Recurrent state of linear attention, per batch row and key/value head, in float32."""

    kv: Float[Array, "b kvh d d"]  # S = sum_j phi(k_j) v_j^T
    k_sum: Float[Array, "b kvh d"]  # z = sum_j phi(k_j)


FEATURE_MAPS = {
    "elu": lambda x: jax.nn.elu(x) + 1.0,
    "relu": jax.nn.relu,
    "softmax": lambda x: jax.nn.softmax(x, axis=-1),
}


def zero_linear_state(batch: int, num_kv_heads: int, head_dim: int) -> LinearState:
    return LinearState(
        jnp.zeros((batch, num_kv_heads, head_dim, head_dim), jnp.float32),
        jnp.zeros((batch, num_kv_heads, head_dim), jnp.float32),
    )


def linear_attention(
    q: Float[Array, "b s h d"],
    k: Float[Array, "b s kvh d"],
    v: Float[Array, "b s kvh d"],
    feature_map: str,
    causal: bool,
    initial_state: LinearState | None,
    chunk_size: int = 64,
) -> tuple[Float[Array, "b s h d"], LinearState]:
    """Katharopoulos et al. linear attention with a carried state (see ``pallas_kernels.linear_attention``)."""
    b, s, h, d = q.shape
    kvh = k.shape[2]
    group = h // kvh
    phi = FEATURE_MAPS[feature_map]
    acc = _accumulation_dtype(q.dtype)
    fq = phi(q.astype(acc)).reshape(b, s, kvh, group, d)
    fk = phi(k.astype(acc))
    vf = v.astype(acc)
    state = zero_linear_state(b, kvh, d) if initial_state is None else initial_state
    # Inside shard_map the carry must vary over the same mesh axes as the inputs.
    kv0, ksum0 = (vary_like(x.astype(acc), fk) for x in state)

    if not causal:
        kv = kv0 + jnp.einsum("bshd,bshe->bhde", fk, vf)
        ksum = ksum0 + jnp.sum(fk, axis=1)
        num = jnp.einsum("bshgd,bhde->bshge", fq, kv)
        den = jnp.einsum("bshgd,bhd->bshg", fq, ksum)
        out = num / (den[..., None] + LINEAR_EPS)
        return out.reshape(b, s, h, d).astype(q.dtype), LinearState(kv, ksum)

    chunk = min(chunk_size, s)
    padded = -(-s // chunk) * chunk
    pad = [(0, 0), (0, padded - s)]
    # Padding after the feature map: padded keys contribute exactly nothing.
    fq = jnp.pad(fq, pad + [(0, 0)] * 3).reshape(b, -1, chunk, kvh, group, d)
    fk = jnp.pad(fk, pad + [(0, 0)] * 2).reshape(b, -1, chunk, kvh, d)
    vf = jnp.pad(vf, pad + [(0, 0)] * 2).reshape(b, -1, chunk, kvh, d)
    lower = jnp.tril(jnp.ones((chunk, chunk), acc))

    def step(carry, xs):
        kv, ksum = carry
        fq_c, fk_c, v_c = xs
        scores = jnp.einsum("bqhgd,bkhd->bhgqk", fq_c, fk_c) * lower
        num = jnp.einsum("bhgqk,bkhe->bqhge", scores, v_c) + jnp.einsum("bqhgd,bhde->bqhge", fq_c, kv)
        den = jnp.einsum("bhgqk->bqhg", scores) + jnp.einsum("bqhgd,bhd->bqhg", fq_c, ksum)
        out = num / (den[..., None] + LINEAR_EPS)
        kv = kv + jnp.einsum("bkhd,bkhe->bhde", fk_c, v_c)
        ksum = ksum + jnp.sum(fk_c, axis=1)
        return (kv, ksum), out

    chunks_first = lambda x: jnp.moveaxis(x, 1, 0)
    (kv, ksum), out = jax.lax.scan(step, (kv0, ksum0), (chunks_first(fq), chunks_first(fk), chunks_first(vf)))
    out = jnp.moveaxis(out, 0, 1).reshape(b, padded, h, d)[:, :s]
    return out.astype(q.dtype), LinearState(kv, ksum)
