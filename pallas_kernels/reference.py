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
from pallas_kernels.masks import segment_starts

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
    segment_ids: Int[Array, "b s"] | None = None,
    query_lengths: Int[Array, "b"] | None = None,
    kv_lengths: Int[Array, "b"] | None = None,
) -> tuple[Float[Array, "b s h d"], LinearState]:
    """Katharopoulos et al. linear attention with a carried state (see ``pallas_kernels.linear_attention``).

    Packed and padded rows are masks on the chunked scan (``_linear_packing``): queries at or past
    ``query_lengths`` and keys at or past ``kv_lengths`` get a zero feature vector; a query reads the keys of its
    own segment and the carried state only if that is its segment's; the state restarts where a valid key opens a
    new segment. Non-causal: the same scan plus the keys after each query in its segment, from a scan over the
    reversed sequence.
    """
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
    packed = not (segment_ids is None and query_lengths is None and kv_lengths is None)

    if not causal and not packed:
        kv = kv0 + jnp.einsum("bshd,bshe->bhde", fk, vf)
        ksum = ksum0 + jnp.sum(fk, axis=1)
        num = jnp.einsum("bshgd,bhde->bshge", fq, kv)
        den = jnp.einsum("bshgd,bhd->bshg", fq, ksum)
        out = num / (den[..., None] + LINEAR_EPS)
        return out.reshape(b, s, h, d).astype(q.dtype), LinearState(kv, ksum)

    segments = None
    if packed:
        seg, q_valid, k_valid = _linear_packing(segment_ids, query_lengths, kv_lengths, b, s)
        fq = jnp.where(q_valid[:, :, None, None, None], fq, 0)
        fk = jnp.where(k_valid[:, :, None, None], fk, 0)
        segments = (seg, k_valid)
    chunk = min(chunk_size, s)
    num, den, final = _linear_scan(fq, fk, vf, kv0, ksum0, chunk, segments)
    if not causal:
        # Each query also reads the later keys of its segment: a strict causal scan over the reversed sequence
        # (segment numbers negated to increase again), from a zero state.
        flip = lambda x: jnp.flip(x, axis=1)
        zeros = (jnp.zeros_like(kv0), jnp.zeros_like(ksum0))
        num_r, den_r, _ = _linear_scan(flip(fq), flip(fk), flip(vf), *zeros, chunk, (-flip(seg), flip(k_valid)),
                                       strict=True)
        num, den = num + flip(num_r), den + flip(den_r)
    out = num / (den[..., None] + LINEAR_EPS)
    return out.reshape(b, s, h, d).astype(q.dtype), LinearState(*final)


def _linear_packing(
    segment_ids: Int[Array, "b s"] | None, query_lengths: Int[Array, "b"] | None, kv_lengths: Int[Array, "b"] | None,
    batch: int, seq_len: int,
) -> tuple[Int[Array, "b s"], Bool[Array, "b s"], Bool[Array, "b s"]]:
    """Each position's segment, as the position where it starts (``masks.segment_starts``: non-decreasing, one value
    per segment), and which queries and keys are valid (before ``query_lengths`` / ``kv_lengths``)."""
    if segment_ids is None:
        seg = jnp.zeros((batch, seq_len), jnp.int32)
    else:
        seg = segment_starts(jnp.asarray(segment_ids))
    positions = jnp.arange(seq_len)

    def valid(lengths):
        if lengths is None:
            return jnp.ones((batch, seq_len), bool)
        return positions[None, :] < jnp.asarray(lengths)[:, None]

    return seg, valid(query_lengths), valid(kv_lengths)


def _linear_scan(
    fq: Float[Array, "b s kvh g d"],
    fk: Float[Array, "b s kvh d"],
    vf: Float[Array, "b s kvh d"],
    kv0: Float[Array, "b kvh d d"],
    ksum0: Float[Array, "b kvh d"],
    chunk: int,
    segments: tuple[Int[Array, "b s"], Bool[Array, "b s"]] | None,
    strict: bool = False,
) -> tuple[Float[Array, "b s kvh g d"], Float[Array, "b s kvh g"], tuple[Array, Array]]:
    """Causal linear attention chunk by chunk: the numerators ``fq_i . (S0 + sum_j fk_j v_j^T)``, the normalisers
    ``fq_i . (z0 + sum_j fk_j)`` (no epsilon) over ``j <= i`` (``j < i`` if ``strict``) and the final state.

    ``segments = (seg, k_valid)``, non-decreasing segment numbers (one per segment) and the valid keys: query i reads key j only if
    ``seg[i] == seg[j]``. The carried state is that of the segment of the last valid key so far (at first the first
    position's, to which ``(S0, z0)`` belongs); a query reads it only if that is its segment, and it restarts
    from zero when a valid key of a later segment enters it. Invalid keys must have ``fk = 0``.
    """
    b, s, kvh, group, d = fq.shape
    padded = -(-s // chunk) * chunk

    def chunked(x):  # [b, s, ...] -> [chunks, b, chunk, ...]; padding after the feature map contributes nothing
        x = jnp.pad(x, [(0, 0), (0, padded - s)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, -1, chunk, *x.shape[2:]), 1, 0)

    order = jnp.tril(jnp.ones((chunk, chunk), bool), -1 if strict else 0)

    def step(carry, xs):
        (kv, ksum), (fq_c, fk_c, v_c) = carry[:2], xs[:3]
        visible, fq_carry = order[None], fq_c
        if segments is not None:
            # The carry also holds the number of the state's segment; xs the chunk's segment numbers and valid keys.
            open_seg, (seg_c, valid_c) = carry[2], xs[3:]
            visible = visible & (seg_c[:, :, None] == seg_c[:, None, :])
            fq_carry = jnp.where((seg_c == open_seg[:, None])[:, :, None, None, None], fq_c, 0)
        scores = jnp.where(visible[:, None, None], jnp.einsum("bqhgd,bkhd->bhgqk", fq_c, fk_c), 0)
        num = jnp.einsum("bhgqk,bkhe->bqhge", scores, v_c) + jnp.einsum("bqhgd,bhde->bqhge", fq_carry, kv)
        den = jnp.einsum("bhgqk->bqhg", scores) + jnp.einsum("bqhgd,bhd->bqhg", fq_carry, ksum)
        segment = ()
        if segments is not None:
            # The segment of the chunk's last valid key (the open one if none): only its keys enter the state,
            # which restarts if that segment is a new one.
            new_seg = jnp.maximum(open_seg, jnp.max(jnp.where(valid_c, seg_c, jnp.iinfo(jnp.int32).min), axis=1))
            fk_c = jnp.where((seg_c == new_seg[:, None])[:, :, None, None], fk_c, 0)
            kept = (new_seg == open_seg)[:, None, None]
            kv, ksum = jnp.where(kept[..., None], kv, 0), jnp.where(kept, ksum, 0)
            segment = (new_seg,)
        kv = kv + jnp.einsum("bkhd,bkhe->bhde", fk_c, v_c)
        ksum = ksum + jnp.sum(fk_c, axis=1)
        return (kv, ksum, *segment), (num, den)

    carry, xs = (kv0, ksum0), (fq, fk, vf)
    if segments is not None:
        seg = segments[0].astype(jnp.int32)
        carry, xs = carry + (vary_like(seg[:, 0], fk),), xs + (seg, segments[1])
    (kv, ksum, *_), (num, den) = jax.lax.scan(step, carry, tuple(map(chunked, xs)))
    unchunk = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, padded, *x.shape[3:])[:, :s]
    return unchunk(num), unchunk(den), (kv, ksum)
