"""Per-device work, traffic and memory of the sharded ops, read from compiled programs on host devices (no GPU).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 PYTHONPATH=. python benchmarks/sharding_hlo.py OUT.json

- batch/head sharding under jit: the shape of the kernel's operands on each device and the collectives left in the
  program (forward and forward+backward of flash attention through the Pallas kernels, interpret mode);
- context parallelism at S = 8192 x devices: bytes each device sends through collective-permutes (K/V and, in the
  backward, dK/dV) and its temporary memory, beside one device holding the whole sequence.
"""

from __future__ import annotations

import functools
import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import pallas_kernels as pk

_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "pred": 1}


def collectives(text: str) -> dict[str, dict[str, int]]:
    """Count and result bytes of each collective in an optimized HLO module (per device)."""
    out: dict[str, dict[str, int]] = {}
    for match in re.finditer(r"= (\(?[^=]*?\)?) (all-gather|all-reduce|collective-permute|all-to-all|reduce-scatter)"
                             r"(-start)?\(", text):
        shapes, op = match.group(1), match.group(2)
        size = sum(_BYTES.get(t, 4) * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
                   for t, dims in re.findall(r"(\w+)\[([\d,]*)\]", shapes))
        entry = out.setdefault(op, {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += size
    return out


def batch_head_sharding(mesh) -> dict:
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((4, 256, 8, 64)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((4, 256, 4, 64)), jnp.float32)
    sh = NamedSharding(mesh, P("data", None, "model"))
    qs, ks = jax.device_put(q, sh), jax.device_put(k, sh)
    fn = functools.partial(pk.flash_attention, implementation="pallas", interpret=True)
    fwd = jax.jit(fn).lower(qs, ks, ks).compile().as_text()
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=(0, 1, 2))).lower(qs, ks, ks).compile().as_text()
    return {"q_global": list(q.shape), "q_per_device": [2, 256, 2, 64],
            "q_shard_in_program": "f32[2,256,2,64]" in fwd,
            "forward_collectives": collectives(fwd), "forward_backward_collectives": collectives(grad)}


def context_parallel(n: int, window: int | None, block: int = 8192, heads: int = 4, kv_heads: int = 2,
                     head_dim: int = 64) -> dict:
    mesh = Mesh(np.array(jax.devices()[:n]), ("seq",))
    seq = block * n
    q = jax.ShapeDtypeStruct((1, seq, heads, head_dim), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, "seq")))
    k = jax.ShapeDtypeStruct((1, seq, kv_heads, head_dim), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, "seq")))
    local = functools.partial(pk.context_parallel_attention, axis_name="seq", window_size=window,
                              implementation="pallas", interpret=True)
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(None, "seq"),) * 3, out_specs=P(None, "seq"),
                            check_vma=False)
    loss = lambda f: jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=(0, 1, 2))
    row = {"devices": n, "seq": seq, "window": window}
    for name, f in (("forward", sharded), ("forward_backward", loss(sharded))):
        compiled = jax.jit(f).lower(q, k, k).compile()
        row[f"{name}_collectives"] = collectives(compiled.as_text())
        row[f"{name}_temp_bytes_per_device"] = int(compiled.memory_analysis().temp_size_in_bytes)
    kv_bytes = 2 * seq * kv_heads * head_dim * 2  # K and V of the whole sequence, bf16
    row["kv_bytes_whole_sequence"] = kv_bytes
    return row


def main(path: str):
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    result = {"jax": jax.__version__, "batch_head": batch_head_sharding(mesh), "context_parallel": []}
    print(json.dumps(result["batch_head"], indent=1), flush=True)
    for n in (2, 4, 8):
        for window in (None, 4096):
            row = context_parallel(n, window)
            print(json.dumps(row), flush=True)
            result["context_parallel"].append(row)
    json.dump(result, open(path, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
