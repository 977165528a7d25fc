"""decode.split: where a decode step's time goes, from XLA's own profile of `generate`.

`generate` (cpu_benchmark shape, random weights, greedy, full depth) runs once under `jax.profiler`;
every operation the XLA runtime executed inside the compiled decode loop is put in one of three
categories by its optimized HLO instruction:

  weight matmuls  dots without batch dimensions: the q/k/v, o, gate/up and down projections of every
                  (loop, layer), the exit gate and the LM head (on CPU each runs as one library call);
  attention       dots with batch dimensions: the scores and weighted values over the cached K/V;
  other           everything else: norms, RoPE, softmax, residual adds, cache writes, sampling, the
                  loop's bookkeeping.

Each category's time per decode step (the profiler slows every operation, so the shares are the
figure to read; the unprofiled step time is shown beside them) is set against the bytes it must
read per step: the weights once per (loop, layer) application plus the LM head, and every (loop,
layer) slot's K/V up to the decode loop's current phase length (`decode.cache_phases`). With this
machine's read bandwidth (a jitted sum over 256 MB, one core) that says whether a part is bound by
memory or by arithmetic.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import gzip
import json
import re
import tempfile
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from ouro_jax import cli
from ouro_jax.benchmarks.common import Result, table, wall
from ouro_jax.inference import decode

CATEGORIES = ("weight matmuls", "attention", "other")
_CONTAINERS = {"while", "conditional", "call", "parameter", "constant", "tuple", "get-tuple-element",
               "bitcast"}  # not timed as operations of their own (containers, or free)
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")


def hlo_categories(hlo_text: str) -> dict[str, str]:
    """Instruction name -> category (`CATEGORIES`) for every instruction of optimized HLO text
    (`Compiled.as_text()`) that runs as an operation of its own; containers (while, conditional) and
    free instructions (parameters, tuples, bitcasts) are left out. A dot, or a fusion whose computation
    (or one it calls) holds a dot, is "attention" if that dot has batch dimensions, else a "weight
    matmul"."""
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
        if opcode in _CONTAINERS:
            continue
        kinds = [k for c in called for k in [dot_kind(c)] if k is not None] if opcode == "fusion" else []
        kind = has_batch if opcode == "dot" else (any(kinds) if kinds else None)
        categories[name] = "other" if kind is None else ("attention" if kind else "weight matmuls")
    return categories


@contextlib.contextmanager
def _recording_compiles() -> Iterator[dict[str, str]]:
    """Within the block, `generate`'s compilations (cleared first, so they happen) record their
    optimized HLO text: {function name: text}."""
    texts, compile_fn = {}, decode._compile

    def recorded(fn, *args):
        compiled = compile_fn(fn, *args)
        texts.setdefault(fn.__name__, compiled.as_text())
        return compiled

    recorded.cache_info = compile_fn.cache_info  # `decode._run` tells compilations from cache hits by it
    compile_fn.cache_clear()
    decode._compile = recorded
    try:
        yield texts
    finally:
        decode._compile = compile_fn


def trace_seconds(trace_dir: str, module: str, categories: dict[str, str]) -> dict[str, float]:
    """Seconds per category of the operations of HLO module `module` (e.g. "jit__decode") in the
    Perfetto trace `jax.profiler.trace(trace_dir, create_perfetto_trace=True)` wrote."""
    (path,) = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)
    with gzip.open(path) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    for event in events:
        args = event.get("args") or {}
        if event.get("ph") == "X" and args.get("hlo_module") == module and args.get("hlo_op") in categories:
            seconds[categories[args["hlo_op"]]] += event["dur"] * 1e-6
    return seconds


def read_bandwidth(megabytes: int = 256, repeats: int = 3) -> float:
    """Bytes/s of a jitted sum over a float32 array of `megabytes` MB, best of `repeats`."""
    x = jnp.ones((megabytes << 18,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    return x.nbytes / min(wall(lambda: total(x).block_until_ready()) for _ in range(repeats))


def _bytes_per_step(config, batch: int, prompt_len: int, new_tokens: int) -> tuple[float, float]:
    """(weight bytes, K/V bytes) a full-depth float32 decode step reads, averaged over the M - 1 steps:
    every (loop, layer) application reads its layer's weights and its slot's K/V (prompt positions and
    the current phase's decoded positions); the LM head is read once."""
    d, f, h = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * h, config.num_key_value_heads * h
    layer = d * (q + 2 * kv) + q * d + 3 * d * f
    slots = config.total_ut_steps * config.num_hidden_layers
    weights = 4 * (slots * layer + config.vocab_size * d)
    phases = decode.cache_phases(new_tokens)
    positions = [prompt_len + next(p for p in phases if i <= p) for i in range(1, new_tokens)]
    return weights, 4 * 2 * slots * batch * kv * float(np.mean(positions))


def split(*, repeats: int, batches: list[int], prompt_len: int = 64, new_tokens: int = 128) -> Result:
    """Per batch size: each category's share of a profiled decode step, its time and what it reads
    (module docstring)."""
    from ouro_jax.benchmarks.decode import _benchmark_model

    if new_tokens < 2:
        raise cli.UserError(f"decode.split: --new_tokens={new_tokens} leaves no decode step; need >= 2")
    model = _benchmark_model()
    cfg = model.config
    bandwidth = read_bandwidth()
    rows, figures = [], []
    for batch in batches:
        ids = np.random.default_rng(batch).integers(3, cfg.vocab_size, (batch, prompt_len))
        with _recording_compiles() as texts:
            decode.generate(model, ids, new_tokens)
        step_s = min(decode.generate(model, ids, new_tokens).stats.decode_s for _ in range(repeats))
        with tempfile.TemporaryDirectory() as trace_dir:
            with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
                profiled = decode.generate(model, ids, new_tokens).stats.decode_s
            seconds = trace_seconds(trace_dir, "jit__decode", hlo_categories(texts["_decode"]))
        steps = new_tokens - 1
        weight_bytes, kv_bytes = _bytes_per_step(cfg, batch, prompt_len, new_tokens)
        total = sum(seconds.values())
        flops = 2 * batch * weight_bytes / 4
        shares = {k: s / total for k, s in seconds.items()}
        figure = {"batch": batch, "step_ms": 1e3 * step_s / steps, "profiled_step_ms": 1e3 * profiled / steps,
                  "ops_ms_per_step": {k: 1e3 * s / steps for k, s in seconds.items()}, "shares": shares,
                  "weight_mb_per_step": weight_bytes / 1e6, "kv_mb_per_step": kv_bytes / 1e6}
        # each category's time in the unprofiled step, in proportion to its share of the operations
        unprofiled = {k: shares[k] * step_s / steps for k in CATEGORIES}
        figure["weight_gflops"] = flops / unprofiled["weight matmuls"] / 1e9
        figure["weight_gb_per_s"] = weight_bytes / unprofiled["weight matmuls"] / 1e9
        figure["kv_gb_per_s"] = kv_bytes / unprofiled["attention"] / 1e9
        figures.append(figure)
        rows.append([batch, f"{figure['step_ms']:.2f}", f"{figure['profiled_step_ms']:.2f}",
                     *(f"{100 * shares[k]:.0f} %" for k in CATEGORIES),
                     f"{figure['weight_mb_per_step']:.1f} MB, {figure['weight_gflops']:.0f} GFLOP/s, "
                     f"{figure['weight_gb_per_s']:.0f} GB/s",
                     f"{figure['kv_mb_per_step']:.1f} MB, {figure['kv_gb_per_s']:.0f} GB/s"])
    text = (f"decode step split (cpu_benchmark shape, random weights, prompt {prompt_len}, {new_tokens} new "
            f"tokens, greedy, full depth, float32; operations of the compiled decode loop from XLA's "
            f"profile; this machine's read bandwidth, one core: {bandwidth / 1e9:.1f} GB/s)\n\n"
            + table(["batch", "ms / step", "ms / step profiled", *(f"{k} share" for k in CATEGORIES),
                     "weight matmuls: read per step, at the unprofiled share",
                     "attention: K/V read per step, at the unprofiled share"], rows))
    return Result(text, {"batches": figures, "read_gb_per_s": bandwidth / 1e9, "prompt_len": prompt_len,
                         "new_tokens": new_tokens, "repeats": repeats})
