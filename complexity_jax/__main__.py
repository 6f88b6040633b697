"""``python -m complexity_jax``: build the five layers at a size fit for this device, run a forward and a
backward pass, check each against the pure-JAX reference on a slice, and print one table.

Time is the median of several compiled runs; memory is the temporary memory of the compiled attention
forward+backward (XLA's memory analysis of the executable), i.e. the activations attention needs.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from complexity_jax.api import CUDA, LAYERS
from complexity_jax.profiling import format_bytes, median_ms, temp_memory_bytes


@dataclass(frozen=True)
class Size:
    batch: int
    seq_len: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    dtype: str


SIZES = {
    "gpu": Size(batch=2, seq_len=8192, hidden_size=4096, num_heads=32, num_kv_heads=8, dtype="bfloat16"),
    "cpu": Size(batch=1, seq_len=2048, hidden_size=512, num_heads=8, num_kv_heads=2, dtype="float32"),
}

FORM_OPTIONS = {
    "flash": {},
    "sliding_window": {"window_size": 512},
    "sparse": {},
    "linear": {},
    "multiscale": {},
}

CHECK_TOKENS = 256


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    default = SIZES["gpu" if jax.default_backend() == "gpu" else "cpu"]
    p = argparse.ArgumentParser(prog="python -m complexity_jax", description=__doc__)
    p.add_argument("--forms", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    p.add_argument("--batch", type=int, default=default.batch)
    p.add_argument("--seq-len", type=int, default=default.seq_len)
    p.add_argument("--hidden-size", type=int, default=default.hidden_size)
    p.add_argument("--num-heads", type=int, default=default.num_heads)
    p.add_argument("--num-kv-heads", type=int, default=default.num_kv_heads)
    p.add_argument("--dtype", default=default.dtype, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=5)
    return p.parse_args(argv)


def run_form(form: str, args: argparse.Namespace) -> dict:
    dtype = jnp.dtype(args.dtype)
    common = dict(hidden_size=args.hidden_size, num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
                  dtype=dtype, **FORM_OPTIONS[form])
    layer = CUDA.create(form, **common)
    x = jax.random.normal(jax.random.key(0), (args.batch, args.seq_len, args.hidden_size), dtype)
    params = layer.init(jax.random.key(1), x[:, :8])

    forward = jax.jit(lambda p, x: layer.apply(p, x)[0])
    loss = lambda p, x: jnp.sum(layer.apply(p, x)[0].astype(jnp.float32) ** 2)
    forward_backward = jax.jit(jax.grad(loss, argnums=(0, 1)))

    out = forward(params, x)
    # Causal layers: the first tokens' outputs equal the outputs of the prefix alone, so the reference
    # only needs to run on that slice (float32, pure JAX).
    reference = CUDA.create(form, **{**common, "dtype": jnp.float32, "implementation": "xla"})
    n = min(CHECK_TOKENS, args.seq_len)
    want = reference.apply(params, x[:, :n].astype(jnp.float32))[0]
    got = out[:, :n].astype(jnp.float32)
    err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    return {
        "form": form,
        "seq_len": args.seq_len,
        "forward_ms": median_ms(forward, params, x, repeats=args.repeats),
        "forward_backward_ms": median_ms(forward_backward, params, x, repeats=args.repeats),
        "memory": temp_memory_bytes(jax.grad(loss, argnums=(0, 1)), params, x),
        "relerr": err,
        "ok": bool(np.isfinite(err) and err < (2e-2 if dtype != jnp.float32 else 1e-3)),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}; "
          f"batch {args.batch}, hidden {args.hidden_size}, heads {args.num_heads}/{args.num_kv_heads}, "
          f"{args.dtype}", flush=True)
    rows = []
    for i, form in enumerate(args.forms, 1):
        print(f"[{i}/{len(args.forms)}] {form}: compiling and timing ...", file=sys.stderr, flush=True)
        rows.append(run_form(form, args))
    header = f"{'form':<15} {'seq_len':>8} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd+bwd temp mem':>17} {'relerr':>9}  check"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['form']:<15} {r['seq_len']:>8} {r['forward_ms']:>9.2f} {r['forward_backward_ms']:>11.2f} "
              f"{format_bytes(r['memory']):>17} {r['relerr']:>9.1e}  {'ok' if r['ok'] else 'FAILED'}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
