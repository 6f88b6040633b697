"""The bench's packed suite (``python -m complexity_jax.bench --suites packed``), one JSON line per row as soon as
it is measured, Mosaic rows and FlexAttention first: for a device call that may be cut short.

    PYTHONPATH=. python benchmarks/packed_rows.py [--repeats N] [--diagnose] [--json OUT.json]

``--diagnose`` runs, instead of the suite, the Mosaic rows that split the packed row's cost (issue 14): the dense
causal kernel; the segment-id kernel on one document per row (the segment path's own cost on dense work); rows of
two 4096-token documents (long documents only) and the same documents as rows of their own (batch 4, no segment
ids); and the suite's packed row (documents of 512-4096). Then each row's forward kernels from a profiler trace.
``--json`` also writes the rows at the end in the bench's JSON layout.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from benchmarks.ab_mosaic import kernel_ms
from complexity_jax import bench


def diagnostic_rows(shape: bench.Shape) -> dict[str, tuple[Callable, float]]:
    """Label -> (attention function, forward FLOPs of its useful pairs)."""
    s, b = shape.seq_len, shape.batch
    impl = bench.ours(False, "pallas_mosaic")
    rows = {
        "dense causal": None,
        "segment ids, one document per row": [[s]] * b,
        f"segment ids, documents of {s // 2}": [[s // 2, s // 2]] * b,
        "segment ids, the suite's documents": bench.packed_documents(s, b),
    }
    out = {}
    for label, docs in rows.items():
        flops = bench.causal_documents_flops(shape, docs or [[s]] * b)
        if docs is None:
            fn = lambda q, k, v: pk.flash_attention(q, k, v, **impl)
        else:
            ids = jnp.asarray(np.stack([np.repeat(np.arange(len(row)), row) for row in docs]), jnp.int32)
            fn = lambda q, k, v, ids=ids: pk.flash_attention(q, k, v, q_segment_ids=ids, **impl)
        out[label] = (fn, flops)
    # The two-document row's work without segment ids: its documents as rows of their own.
    halves = lambda q, k, v: pk.flash_attention(*(x.reshape(2 * b, s // 2, *x.shape[2:]) for x in (q, k, v)),
                                                **impl).reshape(q.shape)
    out[f"dense causal, rows of {s // 2} (batch {2 * b})"] = (halves, out[f"segment ids, documents of {s // 2}"][1])
    return out


def main(argv: list[str]) -> None:
    diagnose = "--diagnose" in argv
    argv = [a for a in argv if a != "--diagnose"]
    args = bench.parse_args(["--suites", "packed", *argv])
    shape, settings, cases = bench.plan(args, interpret=not bench.ON_GPU)
    if diagnose:
        shape = dataclasses.replace(shape, seq_len=args.seq_lens[0] if args.seq_lens else (256 if args.quick else 8192))
        rows = diagnostic_rows(shape)
        repeats = args.repeats or (2 if args.quick else 10)
        settings = dict(settings, shape=dataclasses.asdict(shape), repeats=repeats)
        cases = [bench.timed("packed diagnosis", label, "pallas_mosaic", fn, shape, flops, repeats)
                 for label, (fn, flops) in rows.items()]
    results = []
    for case in sorted(cases, key=lambda c: "pallas_triton" in c.impl):
        results.append(case.run())
        print(json.dumps(dataclasses.asdict(results[-1]), default=str), flush=True)
    if args.json:
        bench.write_results(args.json, bench.run_meta(dict(settings, script=" ".join(sys.argv))), results)
    if diagnose:  # each forward's kernels, XLA's included, from a profiler trace
        q, k, v = shape.arrays()
        for label, (fn, _) in rows.items():
            print(json.dumps(dict(case=label, forward_kernels=kernel_ms(jax.jit(fn), q, k, v))), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
