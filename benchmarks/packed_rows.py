"""The bench's packed suite (``python -m complexity_jax.bench --suites packed``), one JSON line per row as soon as
it is measured, Mosaic rows and FlexAttention first: for a device call that may be cut short.

    PYTHONPATH=. python benchmarks/packed_rows.py [--repeats N]
"""

from __future__ import annotations

import dataclasses
import json
import sys

from complexity_jax import bench


def main(argv: list[str]) -> None:
    _, _, cases = bench.plan(bench.parse_args(["--suites", "packed", *argv]), interpret=not bench.ON_GPU)
    for case in sorted(cases, key=lambda c: "pallas_triton" in c.impl):
        print(json.dumps(dataclasses.asdict(case.run()), default=str), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
