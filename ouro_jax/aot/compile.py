"""Compile the train step (and generation) for a TPU slice on this host and report what it needs.

`train_step` builds the run's programs with `ouro_jax.train.program.build` (the same jitted, donated step,
shardings and gradient accumulation the trainer runs) on a mesh over the slice's compile-only devices,
lowers the step on abstract arguments and compiles it with XLA's TPU compiler. A program larger than a
chip's HBM either fails there with RESOURCE_EXHAUSTED (reported as `fits = False` with the temporaries
the compiler asked for) or compiles to a program over the capacity (`fits = False` from its memory
analysis). `search` finds the largest rows per chip that fit; `serving` compiles the prefill and the
decode loop that `generate` runs (`ouro_jax.inference.decode.programs`).

Byte counts are per chip unless named `_total`; the rows of a batch split over the `data` x `fsdp` mesh
axes ("rows per chip" with mesh.tensor = 1).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ouro_jax import sharding
from ouro_jax.aot import flops as flops_lib
from ouro_jax.aot.topology import Slice, devices
from ouro_jax.cli import UserError
from ouro_jax.data import pipeline
from ouro_jax.train import config as config_lib
from ouro_jax.train import program as program_lib

# "... the total memory required for HLO temporaries (132.79G) exceeds available HBM (95.74G)."
_NEEDED = re.compile(r"\(([\d.]+)([KMGT]?)\) exceeds available HBM")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def state_bytes(abstract_state) -> tuple[int, int]:
    """(total bytes of the train state, bytes of one device's shards of it) from ShapeDtypeStructs
    carrying NamedShardings (every device holds equal shards)."""
    total = per_device = 0
    for x in jax.tree.leaves(abstract_state):
        itemsize = np.dtype(x.dtype).itemsize
        total += math.prod(x.shape) * itemsize
        per_device += math.prod(x.sharding.shard_shape(x.shape)) * itemsize
    return total, per_device


def _working_config(config: ml_collections.ConfigDict, *,
                    rows_chosen: bool = False) -> ml_collections.ConfigDict:
    """An unlocked deep copy that the compile settings may change. `rows_chosen`: the micro-batches will be
    set from a rows-per-chip value, so the config's own `grad_accum_steps` is not validated (one)."""
    copy = ml_collections.ConfigDict(config.to_dict())
    copy.unlock()
    if rows_chosen:
        copy.optimizer.grad_accum_steps = 1
    return copy


def _mesh_and_resolved(config, tpu: Slice, num_slices: int):
    devs = devices(tpu, num_slices)
    resolved = config_lib.validate(config, num_devices=len(devs), process_count=tpu.hosts * num_slices,
                                   platform="tpu", check_inputs=False)
    return sharding.make_mesh(config.mesh.to_dict(), devs), resolved


def batch_shards(mesh) -> int:
    """How many ways the rows of a batch split (the `data` x `fsdp` mesh axes)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def with_rows_per_chip(config, rows_per_chip: int, shards: int) -> ml_collections.ConfigDict:
    """`config` with `optimizer.grad_accum_steps` set so each micro-batch holds `rows_per_chip` rows per
    batch shard; the global batch (`data.batch_size`) is kept."""
    micro_rows = rows_per_chip * shards
    batch = config.data.batch_size
    if rows_per_chip < 1 or batch % micro_rows:
        raise UserError(f"--rows_per_chip={rows_per_chip}: data.batch_size={batch} rows is not a multiple of "
                        f"{rows_per_chip} rows x {shards} batch shards")
    config = _working_config(config)
    config.optimizer.grad_accum_steps = batch // micro_rows
    return config


def _compile(fn, *args):
    """(fn.lower(*args).compile() or None, seconds, bytes of HLO temporaries the compiler asked for when
    they did not fit, else None)."""
    return _compile_lowered(lambda: fn.lower(*args))


def _compile_lowered(lower: Callable[[], jax.stages.Lowered]):
    """`_compile` of the program `lower()` returns (lowering counts in the seconds)."""
    start = time.perf_counter()
    try:
        compiled = lower().compile()
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        found = _NEEDED.search(str(err))
        needed = float(found.group(1)) * _UNITS[found.group(2).upper()] if found else None
        return None, time.perf_counter() - start, needed
    return compiled, time.perf_counter() - start, None


def _memory(compiled, hbm_bytes: int, needed: float | None) -> dict[str, Any]:
    if compiled is None:
        return {"argument_bytes_per_chip": None, "temp_bytes_per_chip": needed,
                "hbm_bytes_per_chip": None, "fits": False}
    m = compiled.memory_analysis()
    hbm = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
           + m.temp_size_in_bytes + m.generated_code_size_in_bytes)
    return {"argument_bytes_per_chip": m.argument_size_in_bytes, "temp_bytes_per_chip": m.temp_size_in_bytes,
            "hbm_bytes_per_chip": hbm, "fits": hbm <= hbm_bytes}


def train_step(config: ml_collections.ConfigDict, tpu: Slice, *, num_slices: int = 1,
               rows_per_chip: int | None = None) -> dict[str, Any]:
    """Compile the train step of `config` for `num_slices` x `tpu`; returns the report (see `FIELDS`)."""
    config = _working_config(config, rows_chosen=rows_per_chip is not None)
    mesh, resolved = _mesh_and_resolved(config, tpu, num_slices)
    shards = batch_shards(mesh)
    if rows_per_chip is not None:
        config = with_rows_per_chip(config, rows_per_chip, shards)
        resolved = config_lib.validate(config, num_devices=mesh.size,
                                       process_count=tpu.hosts * num_slices, platform="tpu",
                                       check_inputs=False)
    start = time.perf_counter()
    program = program_lib.build(config, resolved, mesh)
    init_s = time.perf_counter() - start
    rows, seq = config.data.batch_size, config.data.seq_len
    batch = {k: jax.ShapeDtypeStruct((rows, seq), jnp.int32, sharding=program.batch_sharding)
             for k in pipeline.BATCH_KEYS}
    compiled, compile_s, needed = _compile(program.train_step, program.abstract_state, batch)
    total, per_chip = state_bytes(program.abstract_state)
    chips = mesh.size
    step = flops_lib.train_step_flops(resolved.model, rows, seq, stage=resolved.objective["stage"])
    micro = resolved.micro_batches
    return {
        "program": "train_step", "topology": tpu.name, "num_slices": num_slices, "chips": chips,
        "mesh": dict(mesh.shape), "seq_len": seq, "global_batch_rows": rows, "grad_accum_steps": micro,
        "rows_per_chip": rows // (micro * shards), "num_loops": resolved.model.total_ut_steps,
        "remat_policy": resolved.model.remat_policy, "attention_impl": resolved.model.attention_impl,
        "state_bytes_total": total, "state_bytes_per_chip": per_chip,
        **_memory(compiled, tpu.hbm_bytes, needed), "hbm_capacity_per_chip": tpu.hbm_bytes,
        "model_flops_per_step": step.model, "executed_flops_per_step": step.executed,
        "step_time_lower_bound_s": step.executed / (chips * tpu.peak_flops),
        "mfu_at_lower_bound": step.model / step.executed,
        "compile_s": compile_s, "init_compile_s": init_s,
    }


def row_candidates(config, shards: int) -> list[int]:
    """Every rows-per-chip value that splits `data.batch_size` into whole micro-batches, ascending."""
    per_shard, rem = divmod(config.data.batch_size, shards)
    if rem:
        raise UserError(f"data.batch_size={config.data.batch_size} does not split over {shards} batch shards")
    return [r for r in range(1, per_shard + 1) if per_shard % r == 0]


def largest_fitting(count: int, fits) -> int:
    """The largest index i < count with fits(i), for a `fits` that is True up to some index and False
    after it (memory grows with rows): galloping 0, 1, 3, 7, ... then bisection; -1 when fits(0) is
    False. Calls `fits` O(log count) times."""
    good, i = -1, 0
    while i < count and fits(i):
        good, i = i, 2 * i + 1
    bad = min(i, count)
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def search(config: ml_collections.ConfigDict, tpu: Slice, *, num_slices: int = 1,
           log=lambda report: None) -> tuple[dict | None, list[dict]]:
    """The largest rows per chip whose train step fits, over the values that split the config's batch
    into whole micro-batches. Returns (its report or None, every report, by rows)."""
    mesh, _ = _mesh_and_resolved(_working_config(config, rows_chosen=True), tpu, num_slices)
    candidates = row_candidates(config, batch_shards(mesh))
    tried: dict[int, dict] = {}

    def fits(i: int) -> bool:
        if i not in tried:
            tried[i] = train_step(config, tpu, num_slices=num_slices, rows_per_chip=candidates[i])
            log(tried[i])
        return tried[i]["fits"]

    best = largest_fitting(len(candidates), fits)
    return (tried[best] if best >= 0 else None), [tried[i] for i in sorted(tried)]


def serving(config: ml_collections.ConfigDict, tpu: Slice, *, batch: int, context: int,
            num_slices: int = 1) -> list[dict[str, Any]]:
    """Compile `generate`'s prefill (a `context`-token prompt) and decode loop (one new token over a
    `context`-token cache) at `batch` rows for the slice, parameters sharded as in training. Each report's
    `time_lower_bound_s` is the larger of the FLOPs at peak and one read of its arguments from HBM."""
    from flax import nnx

    from ouro_jax.inference import decode
    from ouro_jax.model.ouro import Ouro

    config = _working_config(config)
    mesh, resolved = _mesh_and_resolved(config, tpu, num_slices)
    cfg = resolved.model
    abstract_model = nnx.eval_shape(lambda: Ouro(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract_model)
    pure = nnx.to_pure_dict(state)
    shardings = sharding.param_shardings(pure, sharding.logical_axes(abstract_model), mesh)
    nnx.replace_by_pure_dict(state, program_lib.abstract_like(pure, shardings))
    programs = decode.programs(nnx.merge(graphdef, state), 2)
    rows = sharding.batch_sharding(mesh)
    vector = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(rows.spec[0]))
    ids = jax.ShapeDtypeStruct((batch, context), jnp.int32, sharding=rows)
    lengths = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=vector)
    keys = jax.ShapeDtypeStruct((batch, 2), jnp.uint32, sharding=rows)
    reports = []
    compiled, seconds, needed = _compile_lowered(lambda: programs.prefill(ids, lengths, keys))
    step = flops_lib.prefill_flops(cfg, batch, context)
    reports.append({"program": "prefill", "batch": batch, "context": context, "seconds": seconds,
                    **_memory(compiled, tpu.hbm_bytes, needed), "flops": step.executed})
    if compiled is not None:
        decode_state = compiled.out_info
        compiled, seconds, needed = _compile_lowered(lambda: programs.decode(decode_state))
        step = flops_lib.decode_flops(cfg, batch, context + programs.spec.max_new_tokens)
        reports.append({"program": "decode_step", "batch": batch, "context": context, "seconds": seconds,
                        **_memory(compiled, tpu.hbm_bytes, needed), "flops": step.executed})
    chips = mesh.size
    for r in reports:  # at least the FLOPs at peak, and reading every argument (weights, cache) once
        compute_s = r["flops"] / (chips * tpu.peak_flops)
        memory_s = None if r["argument_bytes_per_chip"] is None else (
            r["argument_bytes_per_chip"] / tpu.hbm_bandwidth)
        r.update(topology=tpu.name, chips=chips, compute_time_lower_bound_s=compute_s,
                 memory_time_lower_bound_s=memory_s, time_lower_bound_s=max(compute_s, memory_s or 0.0))
    return reports
