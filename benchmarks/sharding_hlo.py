"""Per-device work, traffic and memory of the sharded ops, read from programs compiled for host devices (no GPU).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 PYTHONPATH=. python benchmarks/sharding_hlo.py OUT.json

- batch/head sharding under jit (q ``[4, 256, 8, 64]``, KV 4 heads, mesh ``data=2 x model=4``): the shape of the
  kernel's operands on each device and the collectives left in the program (flash attention through the Pallas
  kernels, interpret mode, forward and forward+backward); and the FLOPs per device (``compiled.cost_analysis()``)
  unsharded and with the batch, the heads or both split, of the XLA path: the Pallas interpret programs are loops
  over the kernel grid, whose body the cost analysis counts once whatever the trip count, so their FLOPs do not
  follow the work.
- context parallelism at S = 8192 x devices: the bytes each device sends through collective-permutes, per ring step
  and in all, and its memory (arguments + outputs + temporaries), beside one device running the whole sequence
  (``flash_attention``, same mask, also interpret mode) and the ratio of the two totals.

Collectives are counted per device: each one's result (what a device receives; a permute sends as much), times the
trip count of the loops around it (XLA's ``known_trip_count``), grouped by loop: a ring of ``n - 1`` steps is one
group with its bytes per step and its steps (XLA removes a loop of one step: at ``n = 2`` the step is outside any
loop). Programs are compiled with the CPU pass ``float-normalization-bf16`` off: it upcasts bf16 collectives (and
other bf16 ops the CPU runs in f32) to f32, which doubled the bytes of the bf16 K/V; a GPU sends bf16.
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

_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1}
_COLLECTIVES = "all-gather|all-reduce|collective-permute|all-to-all|reduce-scatter"
# Keep bf16 as bf16 on the host (see the module docstring).
_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "float-normalization-bf16"}


def compile_program(fn, *args):
    return jax.jit(fn).lower(*args).compile(compiler_options=_COMPILER_OPTIONS)


def _array_bytes(shape_text: str) -> int:
    return sum(_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
               for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", shape_text))


def _instructions(text: str):
    """``(computation, is_entry, line)`` for each instruction line of an HLO module's text."""
    computation, is_entry = None, False
    for line in text.splitlines():
        header = re.match(r"(ENTRY )?%([\w.\-]+) \(", line)
        if header:
            computation, is_entry = header.group(2), bool(header.group(1))
        elif computation is not None and line.startswith("  "):
            yield computation, is_entry, line


def _loops(text: str) -> dict[str, tuple[str | None, int]]:
    """Computation name -> (innermost ``while`` around it, times it runs per program run: ``None`` inside a loop of
    unknown trip count), from the loops' trip counts and the computations each instruction calls (a conditional's
    branches count as run)."""
    calls: dict[str, list[tuple[str, str | None, int | None]]] = {}
    entry = None
    for computation, is_entry, line in _instructions(text):
        entry = computation if is_entry else entry
        callees = re.findall(r"(?:calls|to_apply|true_computation|false_computation)=%([\w.\-]+)", line)
        for branches in re.findall(r"branch_computations=\{([^}]*)\}", line):
            callees += re.findall(r"%([\w.\-]+)", branches)
        edges = calls.setdefault(computation, [])
        edges += [(name, None, 1) for name in callees]
        loop = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = .* while\(.*body=%([\w.\-]+)", line)
        if loop:
            trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            edges.append((loop.group(2), loop.group(1), trips and int(trips.group(1))))
    runs = {entry: (None, 1)}
    pending = [entry]
    while pending:
        caller = pending.pop()
        loop, times = runs[caller]
        for callee, callee_loop, trips in calls.get(caller, []):
            runs[callee] = (callee_loop or loop, None if times is None or trips is None else times * trips)
            pending.append(callee)
    return runs


def collectives(text: str) -> list[dict]:
    """Collectives of an optimized SPMD module, per device: one group per kind and loop body (and per kind outside any
    loop), ``{"op", "in_loop", "steps", "count", "bytes_per_step"}``: ``steps`` is how many times the group runs per
    program run, ``bytes_per_step`` what its ``count`` collectives receive each time."""
    if re.search(rf"({_COLLECTIVES})-start\(", text):
        raise NotImplementedError("asynchronous collectives: their results hold operand and output, count by hand")
    runs = _loops(text)
    groups: dict[tuple[str, str | None], dict] = {}
    for computation, _, line in _instructions(text):
        match = re.match(rf"\s*(?:ROOT )?%[\w.\-]+ = (.+?) ({_COLLECTIVES})\(", line)
        if match:
            loop, steps = runs[computation]
            if steps is None:
                raise ValueError(f"{match.group(2)} in a loop of unknown trip count ({loop})")
            group = groups.setdefault((match.group(2), loop), {
                "op": match.group(2), "in_loop": loop is not None, "steps": steps, "count": 0, "bytes_per_step": 0})
            group["count"] += 1
            group["bytes_per_step"] += _array_bytes(match.group(1))
    return list(groups.values())


def total_bytes(groups: list[dict]) -> int:
    return sum(g["steps"] * g["bytes_per_step"] for g in groups)


def memory(compiled) -> dict[str, int]:
    """Per-device bytes of the arguments, outputs and temporaries of a compiled program, and their sum."""
    analysis = compiled.memory_analysis()
    sizes = {"arguments": analysis.argument_size_in_bytes, "outputs": analysis.output_size_in_bytes,
             "temp": analysis.temp_size_in_bytes}
    return {**{name: int(size) for name, size in sizes.items()}, "total": int(sum(sizes.values()))}


def flops(compiled) -> float:
    """FLOPs per device of a compiled program (``cost_analysis()`` is a dict on JAX 0.10.2 to 0.12)."""
    return float(compiled.cost_analysis()["flops"])


def _loss_gradient(fn):
    return jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), argnums=(0, 1, 2))


def batch_head_sharding(mesh) -> dict:
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((4, 256, 8, 64)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((4, 256, 4, 64)), jnp.float32)
    sh = NamedSharding(mesh, P("data", None, "model"))
    qs, ks = jax.device_put(q, sh), jax.device_put(k, sh)
    fn = functools.partial(pk.flash_attention, implementation="pallas", interpret=True)
    fwd = compile_program(fn, qs, ks, ks).as_text()
    grad = compile_program(_loss_gradient(fn), qs, ks, ks).as_text()
    return {"q_global": list(q.shape), "q_per_device": [2, 256, 2, 64],
            "q_shard_in_program": "f32[2,256,2,64]" in fwd,
            "forward_collectives": collectives(fwd), "forward_backward_collectives": collectives(grad),
            "flops_xla_path": flops_by_sharding(mesh, q, k)}


def flops_by_sharding(mesh, q, k) -> list[dict]:
    """FLOPs per device of the XLA path's forward and forward+backward, inputs unsharded or split over the batch
    (``data``), the heads (``model``) or both, with the ratio to unsharded."""
    fn = functools.partial(pk.flash_attention, implementation="xla")
    splits = {"unsharded": P(), "batch": P("data"), "heads": P(None, None, "model"),
              "batch+heads": P("data", None, "model")}
    rows, unsharded = [], {}
    for name, spec in splits.items():
        sh = NamedSharding(mesh, spec)
        qs, ks = jax.device_put(q, sh), jax.device_put(k, sh)
        row = {"split": name, "spec": str(spec)}
        for program, f in (("forward", fn), ("forward_backward", _loss_gradient(fn))):
            compiled = compile_program(f, qs, ks, ks)
            row[f"{program}_flops"] = flops(compiled)
            unsharded.setdefault(program, row[f"{program}_flops"])
            row[f"{program}_ratio_to_unsharded"] = row[f"{program}_flops"] / unsharded[program]
            row[f"{program}_collectives"] = collectives(compiled.as_text())
        rows.append(row)
    return rows


def context_parallel(n: int, window: int | None, block: int = 8192, heads: int = 4, kv_heads: int = 2,
                     head_dim: int = 64) -> dict:
    """Ring (or window exchange) over ``n`` devices of ``block`` positions each, beside one device holding all
    ``n * block`` positions."""
    mesh = Mesh(np.array(jax.devices()[:n]), ("seq",))
    seq = block * n
    shape = lambda h, sharding=None: jax.ShapeDtypeStruct((1, seq, h, head_dim), jnp.bfloat16, sharding=sharding)
    seq_sharded = NamedSharding(mesh, P(None, "seq"))
    q, k = shape(heads, seq_sharded), shape(kv_heads, seq_sharded)
    local = functools.partial(pk.context_parallel_attention, axis_name="seq", window_size=window,
                              implementation="pallas", interpret=True)
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(None, "seq"),) * 3, out_specs=P(None, "seq"),
                            check_vma=False)
    whole = functools.partial(pk.flash_attention, window_size=window, implementation="pallas", interpret=True)
    row = {"devices": n, "seq": seq, "window": window,
           "kv_bytes_whole_sequence": 2 * seq * kv_heads * head_dim * 2}  # K and V of the whole sequence, bf16
    for name, wrap in (("forward", lambda f: f), ("forward_backward", _loss_gradient)):
        compiled = compile_program(wrap(sharded), q, k, k)
        row[f"{name}_collectives"] = collectives(compiled.as_text())
        row[f"{name}_collective_bytes_per_device"] = total_bytes(row[f"{name}_collectives"])
        row[f"{name}_memory_per_device"] = memory(compiled)
        row[f"{name}_memory_one_device"] = memory(compile_program(wrap(whole), shape(heads), shape(kv_heads),
                                                                  shape(kv_heads)))
        row[f"{name}_memory_ratio"] = (row[f"{name}_memory_per_device"]["total"]
                                       / row[f"{name}_memory_one_device"]["total"])
    return row


def main(path: str):
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    result = {"jax": jax.__version__, "compiler_options": _COMPILER_OPTIONS,
              "batch_head": batch_head_sharding(mesh), "context_parallel": []}
    print(json.dumps(result["batch_head"]), flush=True)
    for n in (2, 4, 8):
        for window in (None, 4096):
            row = context_parallel(n, window)
            print(json.dumps(row), flush=True)
            result["context_parallel"].append(row)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
