"""Float64 numpy references written independently of the library: dense masks, softmax, linear attention."""

from __future__ import annotations

import numpy as np


def window_mask(q_len: int, kv_len: int, windows, causal: bool) -> np.ndarray:
    """bool [heads, q_len, kv_len]; queries are the last q_len positions."""
    i = np.arange(kv_len - q_len, kv_len)[:, None]
    j = np.arange(kv_len)[None, :]
    masks = []
    for w in windows:
        w = np.inf if w is None else w
        masks.append(((i - j >= 0) & (i - j < w)) if causal else (np.abs(i - j) < w))
    return np.stack(masks)


def softmax_attention(q, k, v, mask, scale=None, soft_cap=None, sinks=None) -> np.ndarray:
    """q [b, sq, h, d], k/v [b, sk, kvh, d], mask [h, sq, sk] or [b, h, sq, sk]; ``soft_cap``: scores
    ``cap * tanh(s / cap)``; ``sinks [h]``: an extra logit per head with value zero, seen by every query."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if soft_cap is not None:
        s = soft_cap * np.tanh(s / soft_cap)
    s = np.where(mask, s, -np.inf)
    if sinks is not None:
        sink = np.broadcast_to(np.asarray(sinks, np.float64)[None, :, None, None], (*s.shape[:3], 1))
        s = np.concatenate([s, sink], axis=-1)
    m = s.max(-1, keepdims=True)
    p = np.exp(s - np.where(np.isfinite(m), m, 0.0))
    total = p.sum(-1, keepdims=True)
    p /= np.where(total == 0, 1.0, total)  # rows that see no key output zeros
    if sinks is not None:
        p = p[..., :-1]
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def segment_mask(q_ids, kv_ids) -> np.ndarray:
    """bool [b, 1, sq, sk]: query i sees key j only if their segment ids are equal."""
    q_ids, kv_ids = np.asarray(q_ids), np.asarray(kv_ids)
    return (q_ids[:, :, None] == kv_ids[:, None, :])[:, None]


def cache_mask(lengths, t: int, capacity: int, windows) -> np.ndarray:
    """bool [batch, heads, t, capacity] of decode: query r of row b sits at lengths[b] - t + r and sees slot j iff
    0 <= i - j < W_h (so never a slot at or past lengths[b])."""
    masks = []
    for length in np.asarray(lengths):
        i = (length - t + np.arange(t))[:, None]
        j = np.arange(capacity)[None, :]
        masks.append(np.stack([(i - j >= 0) & (i - j < (np.inf if w is None else w)) for w in windows]))
    return np.stack(masks)


def feature_map(x, name):
    x = np.asarray(x, np.float64)
    if name == "elu":
        return np.where(x > 0, x + 1.0, np.exp(x))
    if name == "relu":
        return np.maximum(x, 0.0)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def linear_attention(q, k, v, name, causal, kv0=None, ksum0=None):
    """Quadratic form; returns (out [b, s, h, d], kv [b, kvh, d, d], k_sum [b, kvh, d])."""
    fq, fk = feature_map(q, name), feature_map(k, name)
    v = np.asarray(v, np.float64)
    b, s, h, d = fq.shape
    kvh = fk.shape[2]
    group = h // kvh
    kv0 = np.zeros((b, kvh, d, d)) if kv0 is None else np.asarray(kv0, np.float64)
    ksum0 = np.zeros((b, kvh, d)) if ksum0 is None else np.asarray(ksum0, np.float64)
    fk_h, v_h = np.repeat(fk, group, axis=2), np.repeat(v, group, axis=2)
    kv0_h, ksum0_h = np.repeat(kv0, group, axis=1), np.repeat(ksum0, group, axis=1)
    scores = np.einsum("bihd,bjhd->bhij", fq, fk_h)
    if causal:
        scores = scores * np.tril(np.ones((s, s)))
    num = np.einsum("bhij,bjhd->bihd", scores, v_h) + np.einsum("bihd,bhde->bihe", fq, kv0_h)
    den = scores.sum(-1).transpose(0, 2, 1) + np.einsum("bihd,bhd->bih", fq, ksum0_h)
    out = num / (den[..., None] + 1e-6)
    kv = kv0 + np.einsum("bjhd,bjhe->bhde", fk, v)
    ksum = ksum0 + fk.sum(1)
    return out, kv, ksum
