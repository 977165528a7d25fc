"""decode.split: where a decode step's time goes, from XLA's own profile of `generate`.

`generate` (cpu_benchmark shape, random weights, greedy, full depth) runs once under `jax.profiler`;
every operation the XLA runtime executed for the compiled decode program (its token loop, plus once
per call the kernels' fusing and the cache's growth between phases) is put in one of three
categories by its optimized HLO instruction:

  weight matmuls  dots without batch dimensions: the q/k/v, o, gate/up and down projections of every
                  (loop, layer), the exit gate and the LM head (on CPU each runs as one library call);
  attention       dots with batch dimensions: the scores and weighted values over the cached K/V;
  other           everything else: norms, RoPE, softmax, residual adds, cache writes, sampling, the
                  loop's bookkeeping (and any operation the HLO text does not name).

Shares are of the operations' summed time, which XLA may spend on two cores at once; the profiler
slows every operation, so the shares are the figure to read, with the unprofiled step time beside
them. Each category's time in the unprofiled step (its share of it) is set against the bytes it must
read per step: the weights once per (loop, layer) application plus the LM head, and every (loop,
layer) slot's K/V up to the decode loop's current phase length (`step.cache_phases`). With this
machine's read bandwidth (a jitted sum over 256 MB) that says whether a part is bound by memory or by
arithmetic.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from ouro_jax import cli
from ouro_jax.aot.flops import layer_flops, readout_flops
from ouro_jax.benchmarks.common import Result, table, wall
from ouro_jax.inference import decode
from ouro_jax.inference.sampling import row_keys
from ouro_jax.inference.step import cache_phases

CATEGORIES = ("weight matmuls", "attention", "other")
_NOT_TIMED = {"while", "conditional", "call", "parameter", "constant", "tuple", "get-tuple-element",
              "bitcast"}  # containers of other operations, or free: no time of their own
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")


def hlo_categories(hlo_text: str) -> dict[str, str]:
    """Instruction name -> category (`CATEGORIES`) for every instruction of optimized HLO text
    (`Compiled.as_text()`, one instruction per line), or None for containers (while, conditional) and
    free instructions (parameters, tuples, bitcasts), which have no time of their own. A dot, or a
    fusion whose computation (or one it calls) holds a dot, is "attention" if that dot has batch
    dimensions, else a "weight matmul"."""
    instructions = {}  # name -> (opcode, called computations, batched dot)
    calls: dict[str, list[str]] = collections.defaultdict(list)
    batched: dict[str, bool] = {}  # computation -> whether its dots have batch dims (absent: no dot)
    computation = ""
    for line in hlo_text.splitlines():
        instruction = _INSTRUCTION.match(line)
        if not instruction:
            header = _COMPUTATION.match(line)
            computation = header.group(1) if header else computation
            continue
        name, _, opcode, rest = instruction.groups()
        called = re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", rest)
        has_batch = opcode == "dot" and "lhs_batch_dims" in rest
        instructions[name] = (opcode, called, has_batch)
        calls[computation] += called
        if opcode == "dot":
            batched[computation] = batched.get(computation, False) or has_batch

    def dot_kind(comp: str, seen: tuple[str, ...] = ()) -> bool | None:
        """Whether the dots in `comp` and what it calls have batch dims; None: no dot there."""
        kinds = [batched[comp]] if comp in batched else []
        kinds += [k for c in calls[comp] if c not in seen
                  for k in [dot_kind(c, (*seen, comp))] if k is not None]
        return any(kinds) if kinds else None

    categories = {}
    for name, (opcode, called, has_batch) in instructions.items():
        if opcode in _NOT_TIMED:
            categories[name] = None
            continue
        kinds = [k for c in called for k in [dot_kind(c)] if k is not None] if opcode == "fusion" else []
        kind = has_batch if opcode == "dot" else (any(kinds) if kinds else None)
        categories[name] = "other" if kind is None else ("attention" if kind else "weight matmuls")
    return categories


def decode_program(model, ids, new_tokens: int) -> tuple[str, str]:
    """(HLO module name, optimized HLO text) of the decode loop `generate(model, ids, new_tokens)` runs
    (`decode.programs`)."""
    programs = decode.programs(model, new_tokens)
    ids = jnp.asarray(ids, jnp.int32)
    lengths = jnp.full(ids.shape[:1], ids.shape[1], jnp.int32)
    _, loop = programs.compiled(ids, lengths, row_keys(jnp.zeros(ids.shape[:1], jnp.uint32)))
    text = loop.as_text()
    return re.match(r"HloModule (\S+?),", text).group(1), text


def trace_seconds(trace_dir: str, module: str, categories: dict[str, str | None]
                  ) -> tuple[dict[str, float], dict[str, int]]:
    """(seconds, operations) per category of the operations of HLO module `module` (e.g. "jit_decode_loop")
    in the Perfetto trace `jax.profiler.trace(trace_dir, create_perfetto_trace=True)` wrote; an
    operation `categories` does not name counts as "other", one it maps to None not at all."""
    (path,) = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)
    with gzip.open(path) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    seconds, operations = dict.fromkeys(CATEGORIES, 0.0), dict.fromkeys(CATEGORIES, 0)
    for event in events:
        args = event.get("args") or {}
        if event.get("ph") != "X" or args.get("hlo_module") != module or "hlo_op" not in args:
            continue
        kind = categories.get(args["hlo_op"], "other")
        if kind is not None:
            seconds[kind] += event["dur"] * 1e-6
            operations[kind] += 1
    return seconds, operations


def read_bandwidth(megabytes: int = 256, repeats: int = 3) -> float:
    """Bytes/s of a jitted sum over a float32 array of `megabytes` MB (10^6 bytes), best of `repeats`."""
    x = jnp.ones((megabytes * 250_000,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    return x.nbytes / min(wall(lambda: total(x).block_until_ready()) for _ in range(repeats))


def _bytes_per_step(config, batch: int, prompt_len: int, new_tokens: int) -> tuple[float, float]:
    """(weight bytes, K/V bytes) a full-depth float32 decode step reads, averaged over the M - 1 steps:
    every (loop, layer) application reads its layer's weights and its slot's K/V (prompt positions and
    the current phase's decoded positions); the LM head is read once. A matmul does one multiply-add
    (2 FLOPs) per weight, so the weight counts are `aot.flops`' per-token FLOPs / 2."""
    layer = layer_flops(config)
    slots = config.total_ut_steps * config.num_hidden_layers
    weights = 4 * (slots * (layer.projections + layer.mlp) + readout_flops(config)[0]) / 2
    kv = config.num_key_value_heads * config.head_dim
    phases = cache_phases(new_tokens)
    positions = [prompt_len + next(p for p in phases if i <= p) for i in range(1, new_tokens)]
    return weights, 4 * 2 * slots * batch * kv * float(np.mean(positions))


def _row(batch, step_s, profiled_s, seconds, operations, weight_bytes, kv_bytes, steps) -> dict:
    """One batch's figures: per step times, shares, operations, bytes and the rates they imply."""
    total = sum(seconds.values())
    shares = {k: x / total for k, x in seconds.items()}
    in_step = {k: shares[k] * step_s / steps for k in CATEGORIES}  # seconds of the unprofiled step
    return {"batch": batch, "step_ms": 1e3 * step_s / steps, "profiled_step_ms": 1e3 * profiled_s / steps,
            "shares": shares, "operations_per_step": sum(operations.values()) / steps,
            "weight_mb_per_step": weight_bytes / 1e6, "kv_mb_per_step": kv_bytes / 1e6,
            "weight_gflops": 2 * batch * (weight_bytes / 4) / in_step["weight matmuls"] / 1e9,
            "weight_gb_per_s": weight_bytes / in_step["weight matmuls"] / 1e9,
            "kv_gb_per_s": kv_bytes / in_step["attention"] / 1e9}


def split(*, repeats: int, batches: list[int], prompt_len: int = 64, new_tokens: int = 128,
          shape: str = "cpu_benchmark") -> Result:
    """Per batch size: each category's share of a profiled decode step, its time and what it reads
    (module docstring)."""
    from ouro_jax.benchmarks.decode import benchmark_model

    if new_tokens < 2:
        raise cli.UserError(f"decode.split: --new_tokens={new_tokens} leaves no decode step; need >= 2")
    model = benchmark_model(shape)
    cfg = model.config
    bandwidth = read_bandwidth()
    rows, figures = [], []
    for batch in batches:
        ids = np.random.default_rng(batch).integers(3, cfg.vocab_size, (batch, prompt_len))
        module, text = decode_program(model, ids, new_tokens)
        decode.generate(model, ids, new_tokens)
        step_s = min(decode.generate(model, ids, new_tokens).stats.decode_s for _ in range(repeats))
        with tempfile.TemporaryDirectory() as trace_dir:
            with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
                profiled_s = decode.generate(model, ids, new_tokens).stats.decode_s
            seconds, operations = trace_seconds(trace_dir, module, hlo_categories(text))
        f = _row(batch, step_s, profiled_s, seconds, operations,
                 *_bytes_per_step(cfg, batch, prompt_len, new_tokens), steps=new_tokens - 1)
        figures.append(f)
        rows.append([batch, f"{f['step_ms']:.2f}", f"{f['profiled_step_ms']:.2f}",
                     f"{f['operations_per_step']:.0f}",
                     *(f"{100 * f['shares'][k]:.0f} %" for k in CATEGORIES),
                     f"{f['weight_mb_per_step']:.1f} MB, {f['weight_gflops']:.0f} GFLOP/s, "
                     f"{f['weight_gb_per_s']:.0f} GB/s",
                     f"{f['kv_mb_per_step']:.1f} MB, {f['kv_gb_per_s']:.0f} GB/s"])
    text = (f"decode step split (cpu_benchmark shape, random weights, prompt {prompt_len}, {new_tokens} new "
            f"tokens, greedy, full depth, float32; operations of the compiled decode program from XLA's "
            f"profile; this machine's read bandwidth: {bandwidth / 1e9:.1f} GB/s)\n\n"
            + table(["batch", "ms / step", "ms / step profiled", "XLA operations / step",
                     *(f"{k} share" for k in CATEGORIES),
                     "weight matmuls: read per step, at the unprofiled share",
                     "attention: K/V read per step, at the unprofiled share"], rows))
    return Result(text, {"batches": figures, "read_gb_per_s": bandwidth / 1e9, "prompt_len": prompt_len,
                         "new_tokens": new_tokens, "repeats": repeats})
