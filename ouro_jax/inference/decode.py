"""Batched generation for Ouro: the public API (`generate`, `left_pad`, `GenerateOutput`) and the
validation of its arguments; the decoding itself is `step.py` (prefill, the token step, the decode loop),
`attention.py` (attention over the cache) and `compaction.py` (row compaction).

Shapes: B batch, P prompt length, M = max_new_tokens, T loops that may run, V vocab.

Loops: users see loops numbered 1..T (`exit_at_loop=k` runs loops 1..k; `GenerateOutput.exit_loops`
holds the loop 1..T each token came from; `GenerateStats.mean_depth` averages it).

Prompts are LEFT-padded: row b's prompt fills the last `prompt_lengths[b]` columns of `input_ids`
(`left_pad` builds such a batch). Each row's RoPE positions start at 0 at its first real token and its
queries never see padding, so a row gives the same tokens in any batch as alone (what HF `generate`
does with a left-padded `attention_mask`). Every row then writes its new tokens at the same cache
position at each decoded token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ouro_jax.inference import step
from ouro_jax.inference.cache import SHARING, KVCache
from ouro_jax.inference.policies import ExitPolicy
from ouro_jax.inference.sampling import row_keys
from ouro_jax.inference.step import SKIPPED_KV, DecodeSpec, DecodeState, Knobs

EXIT_POLICIES = ("gate", "sample", "hidden_delta", "hidden_delta_relative")
DEFAULT_SKIPPED_KV = "project"  # why: the `generate` docstring
DEFAULT_COMPACT_ROWS = True  # why: the `generate` docstring


@dataclasses.dataclass(frozen=True)
class GenerateStats:
    """Run statistics.

    mean_depth: mean loops used per generated (non-pad) token (the mean of `exit_loops`).
    loops_run / loops_full_depth: loops the decode loop ran (one loop = N layers for the batch, or for
      a bucket of its rows) and what full depth would have run for the same tokens.
    row_loops_run / row_loops_full_depth: the rows those loops ran on, summed (B per loop uncompacted,
      the bucket size with `compact_rows`, padding included), and what full depth computes for the same
      tokens (B * loops_full_depth): their ratio is the executed fraction of the decode loop's compute.
    prefill_s, decode_s: wall time of the compiled prefill and decode loop; compile_s: compilation in
      this call (0 when cached).
    tokens_per_s: generated (non-pad) tokens / (prefill_s + decode_s);
    decode_tokens_per_s: tokens produced by the decode loop (all but the first per row) / decode_s.
    cache_bytes: {"prompt", "decoded", "total"} bytes of the KV cache.
    """

    mean_depth: float
    loops_run: int
    loops_full_depth: int
    row_loops_run: int
    row_loops_full_depth: int
    prefill_s: float
    decode_s: float
    compile_s: float
    tokens_per_s: float
    decode_tokens_per_s: float
    cache_bytes: dict[str, int]


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    """tokens [B, M] int32 (pad_id after a row's stop token); exit_loops [B, M] int32, the loop (1..T)
    each token came from, i.e. the loops it ran (0 after the row stopped); lengths [B] generated tokens
    per row (including its stop token); logprobs [B, M] float32 the log-probability of each token under
    the distribution it was sampled from: greedy, log_softmax of its exit loop's logits; sampling, the
    temperature-scaled distribution AFTER the top-k / top-p truncation, renormalised (the sampler's own
    distribution, so exp(logprob) is the probability the token was drawn with; `sampling.sample`); 0
    after a row's stop token; exit_logprobs [B, M] float32 the log-probability of each token's exit loop
    under the gate's exit distribution p(t) over the loops that may run (`exits.log_exit_pdf`): the
    probability that exit policy "sample" draws it (0 after a row's stop token); loop_logits [B, M, T, V]
    float32 every loop's logits of each token, loop t at index t - 1 (skipped loops repeat the exit
    loop's), only with `output_loop_logits=True`; cache: the final `KVCache` (on device)."""

    tokens: np.ndarray
    exit_loops: np.ndarray
    lengths: np.ndarray
    logprobs: np.ndarray
    exit_logprobs: np.ndarray
    stats: GenerateStats
    cache: KVCache
    loop_logits: np.ndarray | None = None


def _execute(model, spec: DecodeSpec, knobs: Knobs, ids, lengths, seeds, forced,
             on_token) -> tuple[DecodeState, float, float, float]:
    """Prefill, then the decode loop (streaming to `on_token` when given).
    Returns (final state, prefill_s, decode_s, compile_s)."""
    graphdef, params = nnx.split(model)
    state, prefill_s, compile_prefill = step.run(
        step.prefill, graphdef, _prefill_spec(spec), params, jnp.asarray(ids), jnp.asarray(lengths),
        row_keys(jnp.asarray(seeds)), None if forced is None else jnp.asarray(forced), knobs)
    stream_id = int(knobs.stream_id)
    if on_token is not None:
        on_token(0, np.asarray(state.tokens[:, 0]), np.asarray(state.exit_index[:, 0]) + 1,
                 np.zeros(ids.shape[0], bool))
        step.STREAMS[stream_id] = on_token
    try:
        state, decode_s, compile_decode = step.run(step.decode_loop, graphdef, spec, params, state, knobs)
    finally:
        step.STREAMS.pop(stream_id, None)
    return state, prefill_s, decode_s, compile_prefill + compile_decode


def _prefill_spec(spec: DecodeSpec) -> DecodeSpec:
    """The prefill computes every loop for every row: these settings do not change it (nor recompile it)."""
    return dataclasses.replace(spec, skipped_kv=DEFAULT_SKIPPED_KV, compact_rows=False)


@dataclasses.dataclass(frozen=True)
class Programs:
    """The two programs `generate` runs for one configuration (`programs`), to lower and compile ahead of
    time or inspect: `prefill(input_ids [B, P], prompt_lengths [B], keys [B], forced [B, M] or None)`
    -> `DecodeState`, then `decode(state)` -> `DecodeState` (the decode loop; it donates `state`).
    Arguments are arrays or `jax.ShapeDtypeStruct`s (with shardings where wanted); each method returns
    the `jax.stages.Lowered` program. graphdef, params: the split model (params may be abstract)."""

    graphdef: Any
    params: Any
    spec: DecodeSpec
    knobs: Knobs

    def prefill(self, input_ids, prompt_lengths, keys, forced=None) -> jax.stages.Lowered:
        return step.lower(step.prefill, self.graphdef, _prefill_spec(self.spec), self.params, input_ids,
                          prompt_lengths, keys, forced, self.knobs)

    def decode(self, state) -> jax.stages.Lowered:
        return step.lower(step.decode_loop, self.graphdef, self.spec, self.params, state, self.knobs)

    def compiled(self, input_ids, prompt_lengths, keys) -> tuple[jax.stages.Compiled, jax.stages.Compiled]:
        """(prefill, decode loop) compiled for these argument shapes: the very programs `generate`
        runs (from its compilation cache, which this fills)."""
        prefill, _ = step.compiled(step.prefill, self.graphdef, _prefill_spec(self.spec), self.params,
                                   input_ids, prompt_lengths, keys, None, self.knobs)
        loop, _ = step.compiled(step.decode_loop, self.graphdef, self.spec, self.params, prefill.out_info,
                                self.knobs)
        return prefill, loop


def programs(model, max_new_tokens: int, **settings) -> Programs:
    """The programs of `generate(model, ..., max_new_tokens, **settings)` (settings: its keyword
    arguments other than prompt_lengths, seed, on_token and forced_tokens; validated as there). `model`
    may be abstract (`nnx.eval_shape`, its state `jax.ShapeDtypeStruct`s)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    defaults = dict(exit_threshold=None, exit_at_loop=None, exit_policy="gate", hidden_delta_eps=0.05,
                    kv_sharing="none", temperature=0.0, top_k=None, top_p=None, stop_tokens=(), pad_id=0,
                    output_loop_logits=False)
    unknown = set(settings) - set(defaults) - {"skipped_kv", "compact_rows"}
    if unknown:
        raise TypeError(f"programs() got unknown settings {sorted(unknown)}")
    spec, knobs = _settings(model.config, max_new_tokens, stream=False, **{**defaults, **settings})
    graphdef, params = nnx.split(model)
    return Programs(graphdef, params, spec, knobs)


# --- the public API ----------------------------------------------------------------------------------
def left_pad(rows: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token-id lists -> (input_ids [B, P] int32 left-padded with `pad_id`, prompt_lengths [B] int32)."""
    lengths = np.asarray([len(r) for r in rows], np.int32)
    ids = np.full((len(rows), max(lengths, default=0)), pad_id, np.int32)
    for row, r in zip(ids, rows, strict=True):
        row[len(row) - len(r):] = r
    return ids, lengths


def _padded(stop_tokens: Sequence[int]) -> list[int]:
    """Stop ids padded with -1 (matches no token) to a multiple of 8, so stop sets share compilations."""
    ids = [int(t) for t in stop_tokens]
    size = max(8, -(-len(ids) // 8) * 8)
    return ids + [-1] * (size - len(ids))


def _inputs(vocab_size: int, input_ids, prompt_lengths, max_new_tokens: int, forced_tokens):
    """Validated (input_ids [B, P] int32, prompt_lengths [B] int32, forced_tokens [B, M] int32 or None)."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be a non-empty [batch, length] integer array, got {ids.shape}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"input_ids must lie in [0, vocab_size={vocab_size})")
    b, p = ids.shape
    lengths = np.full((b,), p, np.int32) if prompt_lengths is None else np.asarray(prompt_lengths, np.int32)
    if lengths.shape != (b,) or lengths.min() < 1 or lengths.max() > p:
        raise ValueError(f"prompt_lengths must be [{b}] values in [1, {p}], got {lengths}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if forced_tokens is not None:
        forced_tokens = np.asarray(forced_tokens)
        if forced_tokens.shape != (b, max_new_tokens) or forced_tokens.min() < 0 or (
                forced_tokens.max() >= vocab_size):
            raise ValueError(f"forced_tokens must be [{b}, {max_new_tokens}] ids in [0, {vocab_size})")
        forced_tokens = forced_tokens.astype(np.int32)
    return ids.astype(np.int32), lengths, forced_tokens


def exit_settings(num_loops, exit_threshold, exit_at_loop, exit_policy, hidden_delta_eps):
    """(ExitPolicy, threshold) from generate's exit arguments, validated (ValueError)."""
    if exit_policy not in EXIT_POLICIES:
        raise ValueError(f"exit_policy={exit_policy!r} must be one of {EXIT_POLICIES}")
    if exit_at_loop is not None:
        if exit_threshold is not None or exit_policy != "gate":
            raise ValueError("exit_at_loop fixes the depth: do not combine it with exit_threshold or "
                             f"exit_policy={exit_policy!r}")
        if not 1 <= exit_at_loop <= num_loops:
            raise ValueError(f"exit_at_loop={exit_at_loop} must lie in [1, {num_loops}]")
        return ExitPolicy("fixed", exit_at_loop), 0.0
    if exit_policy == "sample":
        if exit_threshold is not None:
            raise ValueError("exit_policy='sample' draws each exit from the gate's distribution: do not "
                             "give exit_threshold")
        return ExitPolicy("sample", num_loops), 0.0
    if exit_policy != "gate":
        if exit_threshold is not None:
            raise ValueError(f"exit_threshold is the gate's q; exit_policy={exit_policy!r} uses "
                             "hidden_delta_eps")
        if not hidden_delta_eps > 0:
            raise ValueError(f"hidden_delta_eps={hidden_delta_eps} must be > 0")
        return ExitPolicy(exit_policy, num_loops), hidden_delta_eps
    if exit_threshold is None:
        return ExitPolicy("fixed", num_loops), 0.0
    if not 0.0 <= exit_threshold <= 1.0:
        raise ValueError(f"exit_threshold={exit_threshold} must lie in [0, 1]")
    return ExitPolicy("gate", num_loops), exit_threshold


def effective_skipped_kv(policy: ExitPolicy, skipped_kv: str, kv_sharing: str) -> str:
    """The skipped-K/V policy a configuration runs: a fixed depth skips none of the loops it runs (the
    cache holds just those), so it has nothing to fill: "compute" names that, and spares every decode
    step the "project" fill's N K/V projections; with KV sharing skipped loops are never computed and a
    decoded token has no per-loop slots to fill ("copy")."""
    return "compute" if policy.kind == "fixed" else skipped_kv if kv_sharing == "none" else "copy"


def _settings(config, max_new_tokens: int, *, exit_threshold, exit_at_loop, exit_policy, hidden_delta_eps,
              kv_sharing, temperature, top_k, top_p, stop_tokens, pad_id, output_loop_logits,
              stream: bool, skipped_kv: str = DEFAULT_SKIPPED_KV,
              compact_rows: bool = DEFAULT_COMPACT_ROWS) -> tuple[DecodeSpec, Knobs]:
    """generate's settings, validated, split into the static `DecodeSpec` and the traced `Knobs`."""
    if kv_sharing not in SHARING:
        raise ValueError(f"kv_sharing={kv_sharing!r} must be one of {SHARING}")
    if skipped_kv not in SKIPPED_KV:
        raise ValueError(f"skipped_kv={skipped_kv!r} must be one of {SKIPPED_KV}")
    if temperature < 0 or (top_k is not None and not 1 <= top_k <= config.vocab_size) or (
            top_p is not None and not 0 < top_p <= 1):
        raise ValueError(f"need temperature >= 0, 1 <= top_k <= vocab, 0 < top_p <= 1; got "
                         f"{temperature}, {top_k}, {top_p}")
    policy, threshold = exit_settings(config.total_ut_steps, exit_threshold, exit_at_loop, exit_policy,
                                hidden_delta_eps)
    greedy = temperature == 0
    skipped_kv = effective_skipped_kv(policy, skipped_kv, kv_sharing)
    spec = DecodeSpec(policy=policy, kv_sharing=kv_sharing, skipped_kv=skipped_kv,
                      max_new_tokens=max_new_tokens, greedy=greedy,
                      top_k=None if greedy else top_k, top_p=not greedy and top_p is not None,
                      pad_id=pad_id, keep_loop_logits=output_loop_logits, stream=stream,
                      compact_rows=compact_rows and skipped_kv != "compute",
                      cache_phases=step.cache_phases(max_new_tokens))
    knobs = Knobs(*(jnp.float32(x) for x in (threshold, temperature if not greedy else 1.0,
                                              1.0 if top_p is None else top_p)),
                  stop_tokens=jnp.asarray(_padded(stop_tokens), jnp.int32),
                  stream_id=jnp.int32(next(step.stream_ids)))
    return spec, knobs


def _output(state: DecodeState, spec: DecodeSpec, prefill_s: float, decode_s: float,
            compile_s: float) -> GenerateOutput:
    """The final decode state as host arrays with 1-based exit loops, and the run statistics."""
    tokens, exit_loops = np.asarray(state.tokens), np.asarray(state.exit_index) + 1
    generated = exit_loops > 0
    decode_tokens = int(generated[:, 1:].sum())
    stats = GenerateStats(
        mean_depth=float(exit_loops[generated].mean()),
        loops_run=int(state.loops_run),
        loops_full_depth=(int(state.index) - 1) * spec.policy.num_loops,
        row_loops_run=int(state.row_loops_run),
        row_loops_full_depth=(int(state.index) - 1) * spec.policy.num_loops * tokens.shape[0],
        prefill_s=prefill_s, decode_s=decode_s, compile_s=compile_s,
        tokens_per_s=int(generated.sum()) / (prefill_s + decode_s),
        decode_tokens_per_s=decode_tokens / decode_s if decode_tokens else 0.0,
        cache_bytes=state.cache.nbytes())
    loop_logits = None if state.loop_logits is None else np.asarray(state.loop_logits).transpose(2, 0, 1, 3)
    return GenerateOutput(tokens=tokens, exit_loops=exit_loops, lengths=generated.sum(1).astype(np.int32),
                          logprobs=np.asarray(state.logprobs), exit_logprobs=np.asarray(state.exit_logprobs),
                          stats=stats, cache=state.cache, loop_logits=loop_logits)


def generate(
    model,
    input_ids,
    max_new_tokens: int,
    *,
    prompt_lengths=None,
    exit_threshold: float | None = None,
    exit_at_loop: int | None = None,
    exit_policy: str = "gate",
    hidden_delta_eps: float = 0.05,
    kv_sharing: str = "none",
    skipped_kv: str = DEFAULT_SKIPPED_KV,
    compact_rows: bool = DEFAULT_COMPACT_ROWS,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | Sequence[int] = 0,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    output_loop_logits: bool = False,
    on_token: Callable | None = None,
    forced_tokens=None,
) -> GenerateOutput:
    """Generate `max_new_tokens` tokens per row with a KV cache and per-token adaptive depth.

    Args:
      model: an `ouro_jax.Ouro`.
      input_ids: [B, P] int prompts, left-padded (see `left_pad`).
      max_new_tokens: M >= 1.
      prompt_lengths: [B] real tokens per row (the last ones of each row); default P for every row.
      exit_threshold: Q-exit q in [0, 1] on the gate's CDF (exit_policy "gate"); None: full depth.
      exit_at_loop: k in 1..T: every token runs loops 1..k and uses loop k's logits; loops after k are
        never computed.
      exit_policy: "gate" (Q-exit), "sample" (each token's exit loop drawn from the gate's exit
        distribution, with a key stream of its own from `seed`; `GenerateOutput.exit_logprobs` holds
        each draw's log-probability; no exit_threshold), "hidden_delta" (the paper's rule, §5.4.1:
        exit once ||h_t - h_{t-1}||_2 < hidden_delta_eps, from loop 2 on; h_t is the normed state, so
        eps is in units of ||h||, about sqrt(D) for unit RMS) or "hidden_delta_relative" (exit once
        ||h_t - h_{t-1}||_2 < hidden_delta_eps * ||h_{t-1}||_2); see `policies.py`.
      kv_sharing: "none" | "last" | "average" decode-time KV sharing (`cache.py`).
      skipped_kv: what later tokens read at the loops an early-exiting token skipped (kv_sharing
        "none"; with sharing a decoded token has one entry per layer and skipped loops never run):
        "compute" runs every loop for every token and uses the exit only to pick the logits, exactly the
        released code (identical tokens to the exported PyTorch model's `generate(exit_threshold=q)`),
        but saves no compute; "project" skips the loops and fills their slots with each layer's K/V of
        the exit state (input norm + K/V projections, as CALM does for skipped layers); "copy" skips
        them and fills them with the exit loop's K/V. Default "project": on the trained p-hop demo its
        answers agree with "compute" while skipping loops, and it saves decode time at the cpu_benchmark
        shape (`python -m ouro_jax.benchmarks --bench=decode.exit` measures agreement, accuracy, loops
        run and time per policy; README, Benchmarks). A fixed depth (full, or `exit_at_loop`) skips no
        loop, so this setting does not change it, and it pays for no fill.
      compact_rows: run each loop only on the rows that need it (not yet exited and unfinished),
        gathered into a bucket of a power-of-two size (or B) rows with their cache rows and scattered
        back, so that rows that exited or stopped cost no layer compute (`compaction.py`). The same
        tokens as without it. Off: every loop some row needs runs for the whole batch. It does not
        apply to skipped_kv "compute" (every loop runs for every row by definition) nor to a fixed
        depth (full, or `exit_at_loop`: no row exits early), which then run uncompacted. Default on:
        it cuts decode time at batch 8 and 32 with early exits, though less than the executed row-loops
        fall (attention reads every row's cache slots for buckets of more than B / GATHER_SHARE rows,
        and the LM head, cache writes and K/V fill run for every row); at batch 1 it is the
        uncompacted computation (`python -m ouro_jax.benchmarks --bench=decode.rows
        --row_batches=8,32` measures it). It costs compilation time: one copy of the N layers per
        bucket size and loop.
      temperature: 0 is greedy; otherwise sampling with `top_k` / `top_p`, keys from `seed` (an int, or
        one per row; see `sampling.py`).
      stop_tokens: a row stops after generating one of these (kept in its output), then gets `pad_id`.
      output_loop_logits: also return every loop's logits of every token (for analysis/tests).
      on_token: streaming callback, on_token(index, tokens [B], exit_loops [B], done [B]) with numpy
        arguments for every generated token index, in order; exit_loops as in `GenerateOutput`; `done`
        marks rows that had already stopped (their token is pad_id, their exit loop 0). Changing it
        never recompiles.
      forced_tokens: [B, M] teacher forcing: the decode loop feeds forced_tokens[:, i] back as token i
        instead of the generated one (the last column is never fed). `tokens` are still the model's
        own choices, so token i + 1 is its prediction after prompt + forced_tokens[:, :i + 1]: scoring
        a known continuation with the same cache and adaptive depth as generation.
    """
    cfg = model.config
    ids, lengths, forced = _inputs(cfg.vocab_size, input_ids, prompt_lengths, max_new_tokens, forced_tokens)
    spec, knobs = _settings(
        cfg, max_new_tokens, exit_threshold=exit_threshold, exit_at_loop=exit_at_loop,
        exit_policy=exit_policy, hidden_delta_eps=hidden_delta_eps, kv_sharing=kv_sharing,
        skipped_kv=skipped_kv, compact_rows=compact_rows, temperature=temperature, top_k=top_k, top_p=top_p,
        stop_tokens=stop_tokens,
        pad_id=pad_id, output_loop_logits=output_loop_logits, stream=on_token is not None)
    seeds = np.broadcast_to(np.asarray(seed, np.uint32), (ids.shape[0],))
    state, *timings = _execute(model, spec, knobs, ids, lengths, seeds, forced, on_token)
    return _output(state, spec, *timings)
