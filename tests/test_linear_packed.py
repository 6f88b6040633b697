"""Linear attention over packed sequences (segment ids) and padded rows (lengths), XLA and Pallas (interpret).

The properties: a packed row computes what each segment computes alone (forward and gradients), the state restarting
at each segment start and ``initial_state`` belonging to the first segment; padding outputs zeros and takes zero
gradient; the returned state is that of the last valid token's segment and continues it.

The references, float64: ``segments_alone`` runs every segment on its own (``tests/naive.py``); ``contract`` is the
same function in one dense, differentiable jnp form (block-diagonal visibility), for the gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels._triton import linear as triton_linear
from tests import naive
from tests.conftest import gpu_target, relerr, x64

D = 16
# Two rows of 18 packed differently; in row 0 the id 7 comes back: a new segment.
PACKS = ([5, 1, 9, 3], [2, 7, 4, 5])
IDS = ([7, 3, 7, 3], [9, 5, 6, 5])  # ids that come back start new segments
CASES = [("elu", True), ("relu", True), ("softmax", True), ("elu", False), ("softmax", False)]
PHI = {"elu": lambda x: jax.nn.elu(x) + 1, "relu": jax.nn.relu, "softmax": lambda x: jax.nn.softmax(x, axis=-1)}


def segment_ids(packs=PACKS, ids=IDS) -> np.ndarray:
    return np.stack([np.repeat(i, p) for p, i in zip(packs, ids)]).astype(np.int32)


def inputs(rng, b, s, h=4, kvh=2, d=D, shift=0.0):
    """q, k, v and an initial state (z0 > 0 keeps normalisers away from 0), float64 numpy."""
    make = lambda *shape: rng.standard_normal(shape) * 0.5 + shift
    return make(b, s, h, d), make(b, s, kvh, d), make(b, s, kvh, d), make(b, kvh, d, d), np.abs(make(b, kvh, d)) + 0.5


def cotangents_for(rng, b, s, h=4, kvh=2, d=D):
    return rng.standard_normal((b, s, h, d)), rng.standard_normal((b, kvh, d, d)), rng.standard_normal((b, kvh, d))


def contract(q, k, v, kv0, ks0, *, feature_map, causal, seg, q_len=None, kv_len=None):
    """The contract densely (jnp): query i sees key j iff both lie in the same run of equal ids, j is before
    ``kv_len`` (and j <= i if causal); the first run also sees (kv0, ks0); queries at or past ``q_len`` output 0;
    the state is that of the run of the last valid key (the initial state if that is the first run)."""
    b, s, h, d = q.shape
    group = h // k.shape[2]
    q_len = np.full(b, s) if q_len is None else np.asarray(q_len)
    kv_len = np.full(b, s) if kv_len is None else np.asarray(kv_len)
    run = np.concatenate([np.zeros((b, 1), int), np.cumsum(seg[:, 1:] != seg[:, :-1], axis=1)], axis=1)
    i, j = np.arange(s)[:, None], np.arange(s)[None, :]
    visible = (run[:, :, None] == run[:, None, :]) & (j < kv_len[:, None, None]) & ((j <= i) | (not causal))
    a, fk = PHI[feature_map](q), PHI[feature_map](k)
    scores = jnp.where(visible[:, None], jnp.einsum("bihd,bjhd->bhij", a, jnp.repeat(fk, group, axis=2)), 0.0)
    first = jnp.asarray(run == 0)[:, :, None]
    num = jnp.einsum("bhij,bjhd->bihd", scores, jnp.repeat(v, group, axis=2))
    num = num + first[..., None] * jnp.einsum("bihd,bhde->bihe", a, jnp.repeat(kv0, group, axis=1))
    den = jnp.einsum("bhij->bih", scores) + first * jnp.einsum("bihd,bhd->bih", a, jnp.repeat(ks0, group, axis=1))
    out = jnp.where((i < q_len[:, None, None])[..., None], num / (den[..., None] + 1e-6), 0.0)
    last = np.array([run[r, n - 1] if n else 0 for r, n in enumerate(kv_len)])
    keys = jnp.asarray((j[0] < kv_len[:, None]) & (run == last[:, None]))[..., None, None]
    keep = jnp.asarray(last == 0)[:, None, None]
    state = pk.LinearState(keep[..., None] * kv0 + jnp.einsum("bjkd,bjke->bkde", jnp.where(keys, fk, 0.0), v),
                           keep * ks0 + jnp.sum(jnp.where(keys, fk, 0.0), axis=1))
    return out, state


def segments_alone(q, k, v, kv0, ks0, feature_map, causal, packs):
    """Each segment of each row run on its own (float64 numpy), the first from (kv0, ks0), the others from zero:
    the outputs and the state of each row's last segment."""
    rows, kvs, k_sums = [], [], []
    for r, pack in enumerate(packs):
        outs, start = [], 0
        for n, length in enumerate(pack):
            part = slice(start, start + length)
            s0 = (kv0[r:r + 1], ks0[r:r + 1]) if n == 0 else (None, None)
            out, kv, k_sum = naive.linear_attention(q[r:r + 1, part], k[r:r + 1, part], v[r:r + 1, part],
                                                    feature_map, causal, *s0)
            outs.append(out)
            start += length
        rows.append(np.concatenate(outs, axis=1))
        kvs.append(kv)
        k_sums.append(k_sum)
    return np.concatenate(rows), np.concatenate(kvs), np.concatenate(k_sums)


def run_op(impl: str, q, k, v, feature_map, causal, state=None, **packing):
    """The op on XLA or on the Pallas kernels in interpret mode."""
    options = {"implementation": "xla"} if impl == "xla" else {"implementation": "pallas", "interpret": True}
    return pk.linear_attention(q, k, v, feature_map, causal, state, **packing, **options)


def loss_and_grads(fn, args, cotangents):
    """``fn(*args) -> (out, state)`` under ``jit``: the output, the state and the gradients of all ``args`` of the
    linear function of (out, state) with these ``cotangents``."""
    def loss(*a):
        out, state = fn(*a)
        return sum(jnp.sum(x * c) for x, c in zip((out, *state), cotangents)), (out, state)

    grad = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args))), has_aux=True))
    (_, (out, state)), grads = grad(*args)
    return out, state, grads


def compare(impl: str, fn, want_fn, args64, cotangents, tol):
    """``fn`` (float32 inputs on Pallas, float64 on XLA) against ``want_fn`` in float64: output, state and
    gradients. Returns ``fn``'s (out, state, grads)."""
    with x64():
        want = loss_and_grads(want_fn, [jnp.asarray(x) for x in args64], [jnp.asarray(c) for c in cotangents])
        if impl == "xla":
            got = loss_and_grads(fn, [jnp.asarray(x) for x in args64], [jnp.asarray(c) for c in cotangents])
    if impl != "xla":
        f32 = lambda xs: [jnp.asarray(x, jnp.float32) for x in xs]
        got = loss_and_grads(fn, f32(args64), f32(cotangents))
    names = ["out", "kv", "k_sum"] + [f"grad {i}" for i in range(len(args64))]
    for name, g, w in zip(names, [got[0], *got[1], *got[2]], [want[0], *want[1], *want[2]]):
        assert g.shape == w.shape, name
        assert relerr(g, w) < tol, (name, relerr(g, w))
    return got


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("feature_map,causal", CASES)
def test_packed_row_equals_segments_alone(rng, impl, feature_map, causal):
    """GQA 4/2, two rows packed differently (odd segment lengths, a repeated id), an initial state: the output and
    final state equal those of each segment run alone, and the gradients of q, k, v and the initial state those of
    the same function densely."""
    args = inputs(rng, 2, 18, shift=0.3 if feature_map == "relu" else 0.0)
    seg = segment_ids()
    packed = lambda q, k, v, kv0, ks0: run_op(impl, q, k, v, feature_map, causal, pk.LinearState(kv0, ks0),
                                              q_segment_ids=jnp.asarray(seg))
    dense = lambda *a: contract(*a, feature_map=feature_map, causal=causal, seg=seg)
    tol = 1e-10 if impl == "xla" else 1e-4
    out, state, _ = compare(impl, packed, dense, args, cotangents_for(rng, 2, 18), tol)
    want = segments_alone(*args, feature_map, causal, PACKS)
    for g, w in zip((out, *state), want):
        assert relerr(g, w) < tol


@pytest.mark.parametrize("causal", [True, False])
def test_several_chunks(rng, causal):
    """Segments that start inside chunks, at a chunk's first row, and span three chunks, with padding and query
    lengths that differ from the key lengths: the Pallas kernels at chunk 16 and the XLA scan at chunk 5 against
    the dense contract, forward and gradients."""
    # Row 0: segments at 0, 3, 16 (a chunk's first row) and 36 (past kv_len: its query reads nothing); row 1: one
    # segment over three chunks, keys past 20 and queries past 33 padding.
    seg = segment_ids(([3, 13, 20, 1], [37]), ([1, 2, 1, 0], [4]))
    q_len, kv_len = np.array([37, 33]), np.array([35, 20])
    args = inputs(rng, 2, 37, h=2, kvh=1)
    cotangents = cotangents_for(rng, 2, 37, h=2, kvh=1)
    packing = dict(segment_ids=jnp.asarray(seg), query_lengths=jnp.asarray(q_len), kv_lengths=jnp.asarray(kv_len))
    dense = lambda *a: contract(*a, feature_map="elu", causal=causal, seg=seg, q_len=q_len, kv_len=kv_len)

    def kernels(q, k, v, kv0, ks0):
        return triton_linear.linear_attention(q, k, v, feature_map="elu", causal=causal, interpret=True, chunk_size=16,
                                              initial_state=pk.LinearState(kv0, ks0), **packing)

    def scan(q, k, v, kv0, ks0):
        return pk.reference.linear_attention(q, k, v, "elu", causal, pk.LinearState(kv0, ks0), chunk_size=5,
                                             **packing)

    compare("pallas", kernels, dense, args, cotangents, 1e-4)
    compare("xla", scan, dense, args, cotangents, 1e-10)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("causal", [True, False])
def test_padded_rows(rng, impl, causal):
    """Lengths 13, 7 and 0 on packed rows, garbage after them: outputs and every gradient past the length are exactly
    zero, the outputs before equal the unpadded (truncated) row's segments run alone, and the state is that of the
    last (truncated) segment alone; a row with no valid token returns its initial state."""
    packs, ids = (*PACKS, [18]), (*IDS, [0])
    lengths = np.array([13, 7, 0])
    q, k, v, kv0, ks0 = inputs(rng, 3, 18)
    pad = np.arange(18)[None, :, None, None] >= lengths[:, None, None, None]
    q, k, v = (np.where(pad, 10 * x + 3, x) for x in (q, k, v))
    seg = segment_ids(packs, ids)

    def padded(q, k, v, kv0, ks0):
        return run_op(impl, q, k, v, "elu", causal, pk.LinearState(kv0, ks0), q_segment_ids=jnp.asarray(seg),
                      kv_segment_ids=jnp.asarray(seg), query_seq_lengths=jnp.asarray(lengths),
                      key_value_seq_lengths=jnp.asarray(lengths))

    dense = lambda *a: contract(*a, feature_map="elu", causal=causal, seg=seg, q_len=lengths, kv_len=lengths)
    tol = 1e-10 if impl == "xla" else 1e-4
    out, state, grads = compare(impl, padded, dense, (q, k, v, kv0, ks0), cotangents_for(rng, 3, 18), tol)
    for r, n in enumerate(lengths):
        assert np.all(np.asarray(out[r, n:]) == 0)
        for g in grads[:3]:
            assert np.all(np.asarray(g[r, n:]) == 0)
        if n:
            ends = np.minimum(np.cumsum([0, *packs[r]]), n)
            truncated = [length for length in np.diff(ends) if length]
            want = segments_alone(q[r:r + 1, :n], k[r:r + 1, :n], v[r:r + 1, :n], kv0[r:r + 1], ks0[r:r + 1], "elu",
                                  causal, [truncated])
        else:
            want = np.zeros((1, 0, 4, D)), kv0[r:r + 1], ks0[r:r + 1]
        for g, w in zip((out[r:r + 1, :n], state.kv[r:r + 1], state.k_sum[r:r + 1]), want):
            assert g.size == 0 or relerr(g, w) < tol


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_state_continues_the_last_segment(rng, impl):
    """The state after a packed, padded row, passed as ``initial_state`` to a second packed call, continues the
    row's last segment into the second call's first segment; later segments of the second call start afresh."""
    q, k, v, _, _ = inputs(rng, 1, 30)
    first_ids = np.repeat([2, 5, 2], [4, 6, 8])[None]  # 18 tokens, 16 valid: the last segment is tokens 10..15
    second_ids = np.repeat([9, 1], [5, 7])[None]  # 12 tokens: 5 continue it, 7 start afresh

    @jax.jit
    def both_calls(q, k, v):
        _, state = run_op(impl, q[:, :18], k[:, :18], v[:, :18], "softmax", True, q_segment_ids=first_ids,
                          key_value_seq_lengths=np.array([16]))
        return run_op(impl, q[:, 18:], k[:, 18:], v[:, 18:], "softmax", True, state, q_segment_ids=second_ids)[0]

    if impl == "xla":
        with x64():
            second = both_calls(*map(jnp.asarray, (q, k, v)))
    else:
        second = both_calls(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)))
    cont = np.r_[10:16, 18:23]
    want_cont = naive.linear_attention(q[:, cont], k[:, cont], v[:, cont], "softmax", True)[0]
    want_fresh = naive.linear_attention(q[:, 23:], k[:, 23:], v[:, 23:], "softmax", True)[0]
    assert relerr(second[:, :5], want_cont[:, 6:]) < 1e-5
    assert relerr(second[:, 5:], want_fresh) < 1e-5


def test_traced_arguments_under_jit(rng):
    """Segment ids and lengths may be traced (no range check then): the same results as concrete ones."""
    q = jnp.asarray(inputs(rng, 2, 18)[0], jnp.float32)
    seg, lengths = segment_ids(), np.array([18, 11])
    f = lambda q, seg, lengths: pk.linear_attention(q, q, q, q_segment_ids=seg, query_seq_lengths=lengths,
                                                    implementation="xla")
    eager = f(q, seg, lengths)
    traced = jax.jit(f)(q, jnp.asarray(seg), jnp.asarray(lengths))
    for g, w in zip(jax.tree.leaves(traced), jax.tree.leaves(eager)):
        assert relerr(g, w) < 1e-6


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(q_segment_ids=np.zeros((2, 18), np.float32)), TypeError, "q_segment_ids must be an integer array"),
        (dict(kv_segment_ids=np.zeros((2, 18), bool)), TypeError, "kv_segment_ids must be an integer array"),
        (dict(q_segment_ids=np.zeros((2, 17), np.int32)), ValueError, r"q_segment_ids must have shape .*\(2, 17\)"),
        (dict(q_segment_ids=np.zeros((18,), np.int32)), ValueError, "q_segment_ids must have shape"),
        (dict(q_segment_ids=np.zeros((2, 18), np.int32), kv_segment_ids=np.ones((2, 18), np.int32)), ValueError,
         "kv_segment_ids must equal q_segment_ids"),
        (dict(query_seq_lengths=np.array([3.0, 4.0])), TypeError, "query_seq_lengths must be an integer array"),
        (dict(query_seq_lengths=np.array([3])), ValueError, r"query_seq_lengths must have shape \[batch\]"),
        (dict(key_value_seq_lengths=np.array([3, 19])), ValueError, r"key_value_seq_lengths must lie in \[0, seq_len=18\]"),
        (dict(key_value_seq_lengths=np.array([-1, 4])), ValueError, r"key_value_seq_lengths .*\[-1, 4\]"),
        (dict(query_seq_lengths="all"), TypeError, "query_seq_lengths must be an integer array"),
    ],
)
def test_bad_arguments_raise_naming_them(kwargs, error, match):
    q = jnp.zeros((2, 18, 4, D))
    k = jnp.zeros((2, 18, 2, D))
    with pytest.raises(error, match=match):
        pk.linear_attention(q, k, k, **kwargs, implementation="xla")


def test_packed_kernels_lower_to_triton():
    """The packed forward and backward kernels (causal and non-causal, bf16, two value tiles) lower to Triton."""
    q = jax.ShapeDtypeStruct((2, 200, 4, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 200, 2, 128), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((2, 200), jnp.int32)
    lengths = jax.ShapeDtypeStruct((2,), jnp.int32)
    for causal in (True, False):
        def loss(q, k, v, seg, lengths, causal=causal):
            out, state = triton_linear.linear_attention(q, k, v, feature_map="elu", causal=causal, initial_state=None,
                                                        segment_ids=seg, kv_lengths=lengths)
            return jnp.sum(out.astype(jnp.float32)) + jnp.sum(state.kv)

        with gpu_target():
            lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k, ids, lengths).lower(
                lowering_platforms=("cuda",))
        # Causal: the state walk, the output, dq, the reverse walk and dk/dv; non-causal adds the two suffix walks.
        assert lowered.as_text().count("__gpu$xla.gpu.triton") == (5 if causal else 7)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype,d,tol", [(jnp.bfloat16, 128, 2e-2), (jnp.float32, 64, 1e-4)])
def test_gpu_packed_rows(causal, dtype, d, tol):
    """Compiled for the GPU at the default chunk: 1000-token rows of random segments (lengths 1 to 300), padded
    keys and queries, GQA 6/2: output, state and gradients against the XLA path (float32, same inputs, full-precision
    matmuls: XLA's default on a GPU is TF32, whose 1e-3 error is above the float32 tolerance)."""
    rng = np.random.default_rng(21)
    lengths = [np.diff(np.r_[0, np.sort(rng.choice(np.arange(1, 1000), n, replace=False)), 1000]) for n in (40, 5)]
    seg = segment_ids(lengths, [np.arange(len(x)) for x in lengths])
    q, k, v, kv0, ks0 = inputs(rng, 2, 1000, h=6, kvh=2, d=d)
    packing = dict(q_segment_ids=jnp.asarray(seg), query_seq_lengths=jnp.asarray([990, 1000]),
                   key_value_seq_lengths=jnp.asarray([1000, 777]))
    args = [jnp.asarray(x, dtype) for x in (q, k, v)] + [jnp.asarray(x, jnp.float32) for x in (kv0, ks0)]
    cotangents = [jnp.asarray(c, jnp.float32) for c in cotangents_for(rng, 2, 1000, h=6, kvh=2, d=d)]

    def op(implementation):
        return lambda q, k, v, kv0, ks0: pk.linear_attention(q, k, v, "elu", causal, pk.LinearState(kv0, ks0),
                                                             implementation=implementation, **packing)

    got = loss_and_grads(op("pallas_triton"), args, cotangents)
    with jax.default_matmul_precision("float32"):
        want = loss_and_grads(op("xla"), [x.astype(jnp.float32) for x in args], cotangents)
    for g, w in zip([got[0], *got[1], *got[2]], [want[0], *want[1], *want[2]]):
        assert relerr(g.astype(jnp.float32), w) < tol
