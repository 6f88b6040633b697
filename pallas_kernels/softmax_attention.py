"""Softmax attention ops: flash (causal / full), sliding window, multi-scale, block-sparse and decode.

Layout ``[batch, seq, heads, head_dim]``; keys/values carry ``num_kv_heads`` heads and query head ``h``
reads key/value head ``h // (heads // kv_heads)``. Queries shorter than keys are the last positions of
the key sequence. Every op is a mask from ``masks.py`` over absolute positions, run by one of two
backends chosen by ``implementation``: the Pallas kernels or the pure-JAX reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, Int

from pallas_kernels import _softmax_kernels, reference
from pallas_kernels._autodiff import forward_mode_guard
from pallas_kernels._dispatch import choose_backend, use_pallas
from pallas_kernels._mosaic import softmax as mosaic_softmax
from pallas_kernels._partitioning import per_head_shard
from pallas_kernels._mosaic.softmax import MosaicConfig
from pallas_kernels._triton import decode as triton_decode
from pallas_kernels._triton.softmax import KernelConfig
from pallas_kernels._validation import (
    check_attention_inputs,
    check_bool,
    check_sparse_config,
    check_seq_lengths,
    check_sinks,
    check_window,
    kernel_dtype_reason,
    logits_soft_cap_or_none,
    softmax_scale_or_default,
)
from pallas_kernels.masks import Segments, SparseMask, WindowMask, segments


_OPTIONS_DOC = """
    Packing and padding (keyword-only, ``None`` by default): ``q_segment_ids [b, sq]`` / ``kv_segment_ids [b, sk]``,
    non-negative integer ids of contiguous runs (``kv_segment_ids`` defaults to ``q_segment_ids`` when the lengths
    agree): query ``i`` sees key ``j`` only if their ids are equal, besides the form's own mask, so a packed row
    equals each segment run alone. ``query_seq_lengths`` / ``key_value_seq_lengths [b]``: keys at ``j >= kv
    length`` are invisible; query rows at ``i >= q length`` output zeros and pass zero gradient. The Pallas kernels
    skip the tiles that no query of a tile can see because of segments or lengths.
    ``logits_soft_cap``: scaled scores become ``cap * tanh(s / cap)`` before masking (Gemma 2). ``sinks [heads]``: one
    logit per query head for a key every query sees and whose value is zero (gpt-oss),
    ``out_i = sum_j e^{s_ij} v_j / (e^{sink_h} + sum_j e^{s_ij})``; differentiable. These options run on the Triton
    kernels (``"auto"`` picks them over Mosaic GPU) or XLA."""


def _documents_options(op):
    """Appends ``_OPTIONS_DOC`` to the docstring of an op that takes those options."""
    op.__doc__ = op.__doc__.rstrip() + "\n" + _OPTIONS_DOC + "\n    "
    return op


def _per_head_windows(name: str, windows: int | None | Sequence[int | None], num_heads: int):
    """One static window (Python int or None) per query head, from one window or a sequence of them."""
    if windows is None or np.ndim(windows) == 0:
        return (check_window(name, windows),) * num_heads
    if not isinstance(windows, Sequence):
        raise TypeError(
            f"{name} must be an int, None, or a sequence with one int or None per query head, got {windows!r}"
        )
    windows = tuple(windows)
    if len(windows) != num_heads:
        raise ValueError(
            f"{name} must give one window (int or None) per query head: expected {num_heads}, got {len(windows)}"
        )
    return tuple(check_window(f"{name}[{h}]", w) for h, w in enumerate(windows))


class _Options(NamedTuple):
    """The optional parts of a softmax call's scores: packing/padding, soft-cap and sinks (checked)."""

    segments: Segments | None
    logits_soft_cap: float | None
    sinks: Float[Array, " heads"] | None

    def unsupported_by_mosaic(self) -> str | None:
        used = [name for name, on in (("logits_soft_cap", self.logits_soft_cap is not None),
                                      ("sinks", self.sinks is not None)) if on]
        return f"the Mosaic GPU kernels do not take {', '.join(used)} yet" if used else None

    def xla(self, q, k, v, visible, scale):
        """The XLA path under ``visible`` (the form's own mask) and these options."""
        if self.segments is not None:
            visible = visible & self.segments.visible()
        return reference.softmax_attention(q, k, v, visible, scale, self.logits_soft_cap, self.sinks)


_NO_OPTIONS = _Options(None, None, None)


def _options(q, k, q_segment_ids, kv_segment_ids, query_seq_lengths, key_value_seq_lengths, logits_soft_cap,
             sinks) -> _Options:
    batch, q_len, num_heads, _ = q.shape
    return _Options(
        segments(q_segment_ids, kv_segment_ids, query_seq_lengths, key_value_seq_lengths, batch, q_len, k.shape[1]),
        logits_soft_cap_or_none(logits_soft_cap),
        check_sinks(sinks, num_heads),
    )


def _window_attention(q, k, v, windows, causal, softmax_scale, implementation, interpret, kernel_config,
                      op_name, options: _Options, head_axis_name=None):
    scale = softmax_scale_or_default(softmax_scale, q.shape[-1])
    if kernel_config is not None and not isinstance(kernel_config, (KernelConfig, MosaicConfig)):
        raise TypeError(f"kernel_config must be a KernelConfig (Triton) or a MosaicConfig, got {kernel_config!r}")

    def run(mask: WindowMask):
        kernels = _window_kernels(q, k, mask, interpret, kernel_config, options)
        backend = choose_backend(implementation, op_name, kernels)
        if backend == "xla":
            q_pos, k_pos = reference.causal_positions(q.shape[1], k.shape[1])
            return options.xla(q, k, v, mask.visible(q_pos, k_pos)[None], scale)
        plan = _softmax_kernels.Plan(
            mask, scale, forward_backend=backend, backward_backend=_backward_backend(backend, q, k, mask),
            interpret=interpret,
            triton_config=kernel_config if isinstance(kernel_config, KernelConfig) else None,
            mosaic_config=kernel_config if isinstance(kernel_config, MosaicConfig) else None,
            logits_soft_cap=options.logits_soft_cap,
        )
        return forward_mode_guard(op_name, (q, k, v), lambda: _softmax_kernels.attention(
            q, k, v, plan, options.segments, options.sinks, op_name))

    return _on_local_heads(run, WindowMask(windows, bool(causal)), head_axis_name)


def _head_shards(head_axis_name: str | None) -> int:
    """Number of devices the heads are split over inside ``shard_map`` (1 without ``head_axis_name``)."""
    return 1 if head_axis_name is None else lax.axis_size(head_axis_name)


def _on_local_heads(run, mask: WindowMask | SparseMask, head_axis_name: str | None):
    """``run`` on this device's heads of ``mask`` (all of them without ``head_axis_name``)."""
    if head_axis_name is None:
        return run(mask)
    return per_head_shard(run, mask, lax.axis_index(head_axis_name), lax.axis_size(head_axis_name))


def _backward_backend(forward_backend: str, q, k, mask: WindowMask) -> str:
    """The backward of the forward's backend where it serves, else Triton's (head_dim 256: the Mosaic backward's
    tiles do not fit in shared memory; the residuals are the same)."""
    if forward_backend == "mosaic" and mosaic_softmax.unsupported_reason(q, k, mask, backward=True) is not None:
        return "triton"
    return forward_backend


def _window_kernels(
    q, k, mask: WindowMask, interpret: bool, kernel_config, options: _Options = _NO_OPTIONS
) -> dict[str, str | None]:
    """Each Pallas backend: ``None`` if it serves this call, else why not."""
    dtype_reason = kernel_dtype_reason(q, k)
    mosaic = options.unsupported_by_mosaic() or dtype_reason or mosaic_softmax.unsupported_reason(q, k, mask)
    if interpret:
        mosaic = "interpret=True runs the Triton kernels (JAX 0.11's Mosaic GPU interpreter cannot run wgmma kernels)"
    elif isinstance(kernel_config, KernelConfig):
        mosaic = "kernel_config is a Triton KernelConfig"
    triton = "kernel_config is a MosaicConfig" if isinstance(kernel_config, MosaicConfig) else dtype_reason
    return {"mosaic": mosaic, "triton": triton}


@_documents_options
def flash_attention(
    q: Float[Array, "b sq h d"],
    k: Float[Array, "b sk kvh d"],
    v: Float[Array, "b sk kvh d"],
    causal: bool = True,
    window_size: int | None = None,
    *,
    softmax_scale: float | None = None,
    implementation: str = "auto",
    interpret: bool = False,
    kernel_config: KernelConfig | MosaicConfig | None = None,
    q_segment_ids: Int[Array, "b sq"] | None = None,
    kv_segment_ids: Int[Array, "b sk"] | None = None,
    query_seq_lengths: Int[Array, " b"] | None = None,
    key_value_seq_lengths: Int[Array, " b"] | None = None,
    logits_soft_cap: float | None = None,
    sinks: Float[Array, " h"] | None = None,
) -> Float[Array, "b sq h d"]:
    """Softmax attention; with ``window_size=W`` a sliding window (causal ``0 <= i-j < W``, else ``|i-j| < W``).

    ``implementation``: ``"auto"`` (on a GPU the fastest Pallas backend that serves the call: Mosaic GPU on
    Hopper+ for bf16/fp16 and head_dim 64/128/256 on the JAX versions it is tested on, else Triton; XLA elsewhere),
    ``"pallas"`` (the fastest Pallas backend), ``"pallas_mosaic"`` / ``"pallas_triton"`` (that backend, or
    ``NotImplementedError``), ``"xla"``. At head_dim 256 the Mosaic forward is differentiated by the Triton backward.
    ``kernel_config`` overrides the kernels' tiles: a ``KernelConfig`` (Triton: blocks, warps, stages; default a
    per-shape table) or a ``MosaicConfig`` (Mosaic GPU); it also picks that backend under ``"auto"``/``"pallas"``.
    """
    check_attention_inputs(q, k, v, causal=causal)
    check_bool(interpret=interpret)
    windows = _per_head_windows("window_size", window_size, q.shape[2])
    options = _options(q, k, q_segment_ids, kv_segment_ids, query_seq_lengths, key_value_seq_lengths,
                       logits_soft_cap, sinks)
    return _window_attention(q, k, v, windows, causal, softmax_scale, implementation, interpret, kernel_config,
                             "flash_attention", options)


@_documents_options
def multiscale_attention(
    q: Float[Array, "b sq h d"],
    k: Float[Array, "b sk kvh d"],
    v: Float[Array, "b sk kvh d"],
    window_sizes: Sequence[int | None],
    causal: bool = True,
    *,
    softmax_scale: float | None = None,
    implementation: str = "auto",
    interpret: bool = False,
    kernel_config: KernelConfig | MosaicConfig | None = None,
    head_axis_name: str | None = None,
    q_segment_ids: Int[Array, "b sq"] | None = None,
    kv_segment_ids: Int[Array, "b sk"] | None = None,
    query_seq_lengths: Int[Array, " b"] | None = None,
    key_value_seq_lengths: Int[Array, " b"] | None = None,
    logits_soft_cap: float | None = None,
    sinks: Float[Array, " h"] | None = None,
) -> Float[Array, "b sq h d"]:
    """Softmax attention where query head ``h`` sees a window of ``window_sizes[h]`` (``None``: every key).

    All heads run in one kernel launch; ``kernel_config`` as in ``flash_attention``. Inside ``shard_map`` with the
    heads split over the mesh axis ``head_axis_name``, ``window_sizes`` lists every global head and each device
    applies the windows of the heads it holds (contiguous, in axis order); ``sinks`` are those of the local heads.
    """
    check_attention_inputs(q, k, v, causal=causal)
    check_bool(interpret=interpret)
    if window_sizes is None or np.ndim(window_sizes) == 0:
        raise TypeError(
            f"window_sizes must be a sequence with one int or None per query head, got {window_sizes!r}"
        )
    windows = _per_head_windows("window_sizes", window_sizes, q.shape[2] * _head_shards(head_axis_name))
    options = _options(q, k, q_segment_ids, kv_segment_ids, query_seq_lengths, key_value_seq_lengths,
                       logits_soft_cap, sinks)
    return _window_attention(q, k, v, windows, causal, softmax_scale, implementation, interpret, kernel_config,
                             "multiscale_attention", options, head_axis_name)


@_documents_options
def sparse_attention(
    q: Float[Array, "b sq h d"],
    k: Float[Array, "b sk kvh d"],
    v: Float[Array, "b sk kvh d"],
    block_size: int = 64,
    num_global_tokens: int = 1,
    num_local_blocks: int = 3,
    num_random_blocks: int = 3,
    seed: int = 0,
    causal: bool = True,
    *,
    softmax_scale: float | None = None,
    implementation: str = "auto",
    interpret: bool = False,
    kernel_config: KernelConfig | None = None,
    head_axis_name: str | None = None,
    q_segment_ids: Int[Array, "b sq"] | None = None,
    kv_segment_ids: Int[Array, "b sk"] | None = None,
    query_seq_lengths: Int[Array, " b"] | None = None,
    key_value_seq_lengths: Int[Array, " b"] | None = None,
    logits_soft_cap: float | None = None,
    sinks: Float[Array, " h"] | None = None,
) -> Float[Array, "b sq h d"]:
    """BigBird/Longformer block-sparse softmax attention under ``masks.sparse_mask``.

    Queries are the last ``q_len <= kv_len`` positions. The Pallas kernel visits only the tiles holding a visible
    element (static block tables); ``kernel_config`` as in ``flash_attention`` (default: a per-shape table with
    tiles no larger than ``block_size`` where that is a power of two >= 16). Inside ``shard_map`` with the heads
    split over ``head_axis_name``, each device draws the random blocks of the global heads it holds. With segment ids
    the BigBird mask stays on absolute positions (blocks, global tokens and random blocks of the packed row),
    intersected with the segments; the kernels visit the same tiles as without them.
    """
    num_heads, _ = check_attention_inputs(q, k, v, causal=causal)
    num_heads *= _head_shards(head_axis_name)
    config = SparseMask(num_heads, block_size, num_global_tokens, num_local_blocks, num_random_blocks,
                        seed, causal)
    check_sparse_config(config)
    check_bool(interpret=interpret)
    if kernel_config is not None and not isinstance(kernel_config, KernelConfig):
        raise TypeError(f"kernel_config must be a KernelConfig (the Triton kernels) or None, got {kernel_config!r}")
    if q.shape[1] > k.shape[1]:
        raise ValueError(
            f"sparse_attention needs q_len ({q.shape[1]}) <= kv_len ({k.shape[1]}): queries are the last"
            " positions of the key sequence"
        )
    scale = softmax_scale_or_default(softmax_scale, q.shape[-1])
    options = _options(q, k, q_segment_ids, kv_segment_ids, query_seq_lengths, key_value_seq_lengths,
                       logits_soft_cap, sinks)
    pallas = use_pallas(implementation, "sparse_attention", kernel_dtype_reason(q, k))

    def run(mask: SparseMask):
        if pallas:
            plan = _softmax_kernels.Plan(mask, scale, triton_config=kernel_config, interpret=interpret,
                                         logits_soft_cap=options.logits_soft_cap)
            return forward_mode_guard("sparse_attention", (q, k, v), lambda: _softmax_kernels.attention(
                q, k, v, plan, options.segments, options.sinks, "sparse_attention"))
        q_pos, k_pos = reference.causal_positions(q.shape[1], k.shape[1])
        visible = mask.visible(q_pos, k_pos, -(-k.shape[1] // block_size))[None]
        return options.xla(q, k, v, visible, scale)

    return _on_local_heads(run, config, head_axis_name)


def attention_at_positions(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b L kvh d"],
    v: Float[Array, "b L kvh d"],
    q_pos: Int[Array, "b t"],
    k_pos: Int[Array, "b L"],
    mask: WindowMask | SparseMask,
    *,
    num_blocks: int | None = None,
    softmax_scale: float | None = None,
    implementation: str = "auto",
    interpret: bool = False,
    logits_soft_cap: float | None = None,
    sinks: Float[Array, " h"] | None = None,
) -> Float[Array, "b t h d"]:
    """Softmax attention of queries at absolute positions ``q_pos`` over keys at ``k_pos`` (-1: empty slot).

    The general form behind the caches (ring buffers store keys out of order). ``num_blocks`` is
    needed by a ``SparseMask``: a static bound on the query blocks, ``max(q_pos) // block_size < num_blocks``.
    ``logits_soft_cap`` and ``sinks`` as in ``flash_attention``.
    """
    check_attention_inputs(q, k, v, causal=False)
    logits_soft_cap = logits_soft_cap_or_none(logits_soft_cap)
    sinks = check_sinks(sinks, q.shape[2])
    if use_pallas(implementation, "attention_at_positions", "it has no Pallas kernel"):
        raise AssertionError("unreachable: no Pallas kernel is registered")
    if isinstance(mask, SparseMask):
        if num_blocks is None:
            raise ValueError("num_blocks must be given with a SparseMask, got None")
        visible = mask.visible(q_pos, k_pos, num_blocks)
    else:
        visible = mask.visible(q_pos, k_pos)
    scale = softmax_scale_or_default(softmax_scale, q.shape[-1])
    return reference.softmax_attention(q, k, v, visible, scale, logits_soft_cap, sinks)


def decode_attention(
    q: Float[Array, "b t h d"],
    k_cache: Float[Array, "b L kvh d"],
    v_cache: Float[Array, "b L kvh d"],
    lengths: Int[Array, "b"],
    window_size: int | None | Sequence[int | None] = None,
    *,
    sparse_mask: SparseMask | None = None,
    softmax_scale: float | None = None,
    implementation: str = "auto",
    interpret: bool = False,
    kernel_config: triton_decode.DecodeConfig | None = None,
    logits_soft_cap: float | None = None,
    sinks: Float[Array, " h"] | None = None,
) -> Float[Array, "b t h d"]:
    """Causal attention of ``t`` new queries against a preallocated cache.

    ``lengths[b]`` (integers) counts the filled cache slots of row ``b`` *including* the ``t`` new tokens, so query
    ``r`` sits at position ``lengths[b] - t + r`` and sees slots ``j < lengths[b]`` with ``j`` not after
    it (and within ``window_size``: one int/None, or one per query head); a query at a negative position sees
    nothing and outputs zeros. Concrete ``lengths`` must lie in ``[0, capacity]`` (``ValueError`` otherwise);
    traced ones cannot be checked, and values outside that range give unspecified outputs. Slots at or past
    ``lengths[b]`` never reach an output on either path, whatever they hold (NaN included).

    ``sparse_mask``: a causal ``SparseMask`` with one head per query head replaces the window (give one or the other,
    not both): slot ``j`` is visible iff ``SparseMask.visible`` says so for the query's position, with the random
    blocks drawn for ``cdiv(capacity, block_size)`` query blocks (a causal draw does not depend on that number, so
    a continuation sees what ``sparse_attention``'s prefill saw). The kernel visits only the key blocks of the local
    band, the global tokens and the random blocks of each row's queries. A non-causal mask cannot be decoded
    (``ValueError``).

    The Pallas kernel (split-K flash-decoding) is forward only: under ``"auto"`` ``jax.grad`` differentiates
    the XLA path (``q``, the caches and ``sinks``), under ``"pallas"`` it raises ``NotImplementedError``.
    ``kernel_config`` overrides its block size, number of key splits and launch settings (default: a heuristic).
    ``logits_soft_cap`` and ``sinks`` as in ``flash_attention`` (a row that sees no slot outputs zeros, with sinks
    too); the kernel applies both.
    """
    num_heads, _ = check_attention_inputs(q, k_cache, v_cache, causal=False)
    check_bool(interpret=interpret)
    lengths = check_seq_lengths("lengths", lengths, q.shape[0], k_cache.shape[1], "capacity")
    if sparse_mask is not None:
        if window_size is not None:
            raise ValueError("decode_attention takes window_size or sparse_mask, not both")
        if not isinstance(sparse_mask, SparseMask):
            raise TypeError(f"sparse_mask must be a pallas_kernels.SparseMask or None, got {sparse_mask!r}")
        check_sparse_config(sparse_mask)
        if not sparse_mask.causal:
            raise ValueError("sparse_mask must be causal: a non-causal SparseMask cannot be decoded (its queries"
                             " see later positions, which a cache does not hold)")
        if sparse_mask.num_heads != num_heads:
            raise ValueError(f"sparse_mask must have one head per query head: q has {num_heads}, sparse_mask"
                             f" {sparse_mask.num_heads}")
        windows, mask = None, sparse_mask
    else:
        windows = _per_head_windows("window_size", window_size, num_heads)
        mask = WindowMask(windows, causal=True)
    scale = softmax_scale_or_default(softmax_scale, q.shape[-1])
    logits_soft_cap = logits_soft_cap_or_none(logits_soft_cap)
    sinks = check_sinks(sinks, num_heads)
    if kernel_config is not None and not isinstance(kernel_config, triton_decode.DecodeConfig):
        raise TypeError(f"kernel_config must be a DecodeConfig or None, got {kernel_config!r}")
    if use_pallas(implementation, "decode_attention", kernel_dtype_reason(q, k_cache)):
        kernel = lambda: triton_decode.decode_attention(
            q, k_cache, v_cache, lengths, windows=windows, sparse_mask=sparse_mask, softmax_scale=scale,
            interpret=interpret, config=kernel_config, xla_backward=implementation == "auto",
            logits_soft_cap=logits_soft_cap, sinks=sinks,
        )
        return forward_mode_guard("decode_attention", (q, k_cache, v_cache, sinks), kernel)
    q_pos, k_pos = reference.cache_positions(lengths, q.shape[1], k_cache.shape[1])
    num_blocks = None if sparse_mask is None else -(-k_cache.shape[1] // sparse_mask.block_size)
    return attention_at_positions(
        q, k_cache, v_cache, q_pos, k_pos, mask, num_blocks=num_blocks,
        softmax_scale=scale, implementation="xla", logits_soft_cap=logits_soft_cap, sinks=sinks,
    )
