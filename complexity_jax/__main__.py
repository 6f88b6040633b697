"""python -m complexity_jax: build the five layers at a size fit for this device, run a forward and a
backward pass, check the outputs and gradients against the pure-JAX float32 reference, and print one table.

Each row says which path ran (read from the traced program): Pallas-Mosaic or Pallas-Triton kernels on a GPU,
XLA elsewhere. Off a GPU a second set of rows runs the Pallas kernels in interpret mode at a small size, so the
kernels are checked on any machine (interpret mode is an emulator: those rows are not timed).

Time is the median of several compiled runs; memory is the temporary memory of the compiled attention
forward+backward (XLA's memory analysis of the executable), i.e. the activations attention needs.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from complexity_jax.api import CUDA, LAYERS
from complexity_jax.profiling import format_bytes, format_table, kernel_paths, median_ms, temp_memory_bytes

ON_GPU = jax.default_backend() == "gpu"


@dataclasses.dataclass(frozen=True)
class Size:
    batch: int
    seq_len: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    dtype: str


SIZES = {
    "gpu": Size(batch=2, seq_len=8192, hidden_size=4096, num_heads=32, num_kv_heads=8, dtype="bfloat16"),
    "cpu": Size(batch=1, seq_len=1024, hidden_size=256, num_heads=4, num_kv_heads=2, dtype="float32"),
}
# The kernels in interpret mode (off a GPU): small enough for an emulator, large enough for several tiles per form.
INTERPRET_SIZE = Size(batch=1, seq_len=64, hidden_size=64, num_heads=4, num_kv_heads=2, dtype="float32")

CHECK_TOKENS = 256  # the reference runs on the first tokens only (causal: their outputs need nothing later)
TOLERANCE = {"float32": 1e-3, "bfloat16": 2e-2, "float16": 2e-2}  # relative error of outputs and gradients


@dataclasses.dataclass(frozen=True)
class Job:
    """One row of the table: a form at a size, on an implementation."""

    form: str
    size: Size
    implementation: str
    interpret: bool
    repeats: int  # 0: not timed

    @property
    def options(self) -> dict[str, Any]:
        """The form's own arguments, scaled to the sequence length so that each mask has several blocks."""
        s = self.size.seq_len
        return {
            "flash": {},
            "sliding_window": {"window_size": s // 4},
            "sparse": {"block_size": max(16, s // 32)},
            "linear": {},
            "multiscale": {"window_sizes": (s // 16, s // 8, s // 4)},
        }[self.form]

    @property
    def label(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.form} ({options})" if options else self.form

    def layer(self, dtype: Any, implementation: str, interpret: bool) -> nn.Module:
        return CUDA.create(self.form, hidden_size=self.size.hidden_size, num_heads=self.size.num_heads,
                           num_kv_heads=self.size.num_kv_heads, dtype=dtype, implementation=implementation,
                           interpret=interpret, **self.options)


@dataclasses.dataclass(frozen=True)
class Row:
    job: Job
    path: str
    forward_ms: float | None
    forward_backward_ms: float | None
    memory: int | None
    output_error: float
    gradient_error: float

    @property
    def ok(self) -> bool:
        tolerance = TOLERANCE[self.job.size.dtype]
        errors = np.array([self.output_error, self.gradient_error])
        return bool(np.all(np.isfinite(errors)) and np.all(errors < tolerance))


def relative_error(got: Any, want: Any) -> float:
    """``|got - want| / |want|`` over every leaf of two pytrees of arrays, in float32."""
    flat = lambda tree: jnp.concatenate([jnp.ravel(a).astype(jnp.float32) for a in jax.tree.leaves(tree)])
    got, want = flat(got), flat(want)
    return float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))


def run(job: Job) -> Row:
    """Builds the layer, finds the path it runs, times it (``job.repeats > 0``) and checks it on a prefix."""
    size = job.size
    dtype = jnp.dtype(size.dtype)
    layer = job.layer(dtype, job.implementation, job.interpret)
    reference = job.layer(jnp.float32, "xla", False)
    x = jax.random.normal(jax.random.key(0), (size.batch, size.seq_len, size.hidden_size), dtype)
    params = layer.init(jax.random.key(1), x[:, :8])

    def loss(module: nn.Module):
        return lambda p, x: jnp.sum(module.apply(p, x)[0].astype(jnp.float32) ** 2)

    gradient = jax.grad(loss(layer), argnums=(0, 1))
    path = kernel_paths(gradient, params, x)
    forward_ms = forward_backward_ms = None
    if job.repeats:
        forward_ms = median_ms(jax.jit(lambda p, x: layer.apply(p, x)[0]), params, x, repeats=job.repeats)
        forward_backward_ms = median_ms(jax.jit(gradient), params, x, repeats=job.repeats)

    prefix = x[:, :min(CHECK_TOKENS, size.seq_len)]
    params32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    want_out = reference.apply(params32, prefix.astype(jnp.float32))[0]
    want_grad = jax.grad(loss(reference), argnums=(0, 1))(params32, prefix.astype(jnp.float32))
    return Row(
        job=job,
        path=path,
        forward_ms=forward_ms,
        forward_backward_ms=forward_backward_ms,
        memory=temp_memory_bytes(gradient, params, x) if job.repeats else None,
        output_error=relative_error(jax.jit(lambda p, x: layer.apply(p, x)[0])(params, prefix), want_out),
        gradient_error=relative_error(jax.jit(gradient)(params, prefix), want_grad),
    )


def jobs(args: argparse.Namespace) -> list[Job]:
    """The device rows at the requested size and, off a GPU, the interpret-mode rows at ``INTERPRET_SIZE``."""
    size = Size(args.batch, args.seq_len, args.hidden_size, args.num_heads, args.num_kv_heads, args.dtype)
    device = [Job(form, size, args.implementation, False, args.repeats) for form in args.forms]
    if ON_GPU or args.no_interpret:
        return device
    return device + [Job(form, INTERPRET_SIZE, "pallas", True, 0) for form in args.forms]


def format_rows(rows: list[Row]) -> str:
    header = ["form", "path", "batch x seq", "fwd ms", "fwd+bwd ms", "fwd+bwd temp mem", "out err", "grad err",
              "check"]
    ms = lambda t: "-" if t is None else f"{t:.2f}"
    cells = [[r.job.label, r.path, f"{r.job.size.batch} x {r.job.size.seq_len}", ms(r.forward_ms),
              ms(r.forward_backward_ms), "-" if r.memory is None else format_bytes(r.memory), f"{r.output_error:.1e}", f"{r.gradient_error:.1e}",
              "ok" if r.ok else "FAILED"] for r in rows]
    return format_table(header, cells, "<<>>>>>><")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    default = SIZES["gpu" if ON_GPU else "cpu"]
    p = argparse.ArgumentParser(prog="python -m complexity_jax", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--forms", nargs="+", default=list(LAYERS), choices=list(LAYERS),
                   help="the forms to run (default: all five)")
    p.add_argument("--batch", type=int, default=default.batch, help=f"default on this device: {default.batch}")
    p.add_argument("--seq-len", type=int, default=default.seq_len, help=f"default on this device: {default.seq_len}")
    p.add_argument("--hidden-size", type=int, default=default.hidden_size,
                   help=f"default on this device: {default.hidden_size}")
    p.add_argument("--num-heads", type=int, default=default.num_heads,
                   help=f"query heads (default on this device: {default.num_heads})")
    p.add_argument("--num-kv-heads", type=int, default=default.num_kv_heads,
                   help=f"key/value heads, GQA when fewer (default on this device: {default.num_kv_heads})")
    p.add_argument("--dtype", default=default.dtype, choices=list(TOLERANCE),
                   help=f"default on this device: {default.dtype}")
    p.add_argument("--implementation", default="auto", choices=["auto", "pallas", "pallas_triton", "pallas_mosaic",
                                                                 "xla"],
                   help="which path the main rows ask for (default: auto, the fastest path this device has)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement, median reported (default: 5)")
    p.add_argument("--no-interpret", action="store_true",
                   help="off a GPU, skip the rows that run the Pallas kernels in interpret mode")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}; "
          f"hidden {args.hidden_size}, heads {args.num_heads}/{args.num_kv_heads}, {args.dtype}", flush=True)
    todo = jobs(args)
    rows = []
    for i, job in enumerate(todo, 1):
        what = "checking in interpret mode" if job.interpret else "compiling, timing and checking"
        print(f"[{i}/{len(todo)}] {job.form}: {what} ...", file=sys.stderr, flush=True)
        rows.append(run(job))
    print(format_rows(rows))
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
