"""Batched generation for Ouro: a jitted prefill and a jitted decode loop with per-token adaptive depth.

Shapes: B batch, P prompt length, M = max_new_tokens, T loops that may run, N layers, D hidden,
Nq query heads, K kv heads, H head_dim, V vocab.

Loops: users see loops numbered 1..T (`exit_at_loop=k` runs loops 1..k; `GenerateOutput.exit_loops`
holds the loop 1..T each token came from; `GenerateStats.mean_depth` averages it). Inside this module a
loop is its 0-based loop index t (t = 0 is loop 1); `exit_index` is such an index, -1 where no token was
generated.

Prompts are LEFT-padded: row b's prompt fills the last `prompt_lengths[b]` columns of `input_ids`
(`left_pad` builds such a batch). Each row's RoPE positions start at 0 at its first real token and its
queries never see padding, so a row gives the same tokens in any batch as alone (what HF `generate`
does with a left-padded `attention_mask`). Every row then writes its new tokens at the same cache
position at each decoded token.

Engine (functional: the model is `nnx.split` once, the jitted functions take its params). Both phases run
the model's own decoder layers (`DecoderLayer.with_kv`, which also returns each layer's k, v), sliced off
the stack and fused (`DecoderLayer.fuse`: one q/k/v and one gate/up matmul) once outside the loops; only
the layers' `attend` hook differs:
  prefill  all prompt tokens through all T loops with `masked_attention` under the left-padding mask
           (the prompt keeps every (loop, layer) K/V, see `cache.py`); the first new token comes from
           the last position at its exit loop (the policy applied to the already computed loops:
           prefill saves no compute).
  decode   `lax.while_loop` over tokens, stopping when all rows are done or M tokens exist; attention is
           `_cached_attention` over the cache. The loop runs in phases (`cache_phases`): the decoded-token
           slots grow from 64 positions, doubling, to M, so a token's attention reads at most twice the
           positions filled so far instead of all M (every (loop, layer) reads its own slots from memory
           for every token). A token's T loops are unrolled (unrolling lets every
           loop address its own cache slots statically; a dynamic loop index would copy the loop's
           whole cache slice each time). The exit policy (`policies.py`) picks each row's exit loop,
           whose state (hence logits) is frozen there. What happens to the loops after it is
           `skipped_kv` (`SKIPPED_KV`, with kv_sharing "none"; a fixed depth skips none of the loops
           it runs, so it runs as "compute"):
             compute  every loop runs for every row, so every (loop, layer) slot holds real K/V: the
                      released code's semantics, no compute saved;
             project  loop index t > 0 runs under `lax.cond` only while some unfinished row has not
                      exited, so loops no row needs are skipped; a skipped loop's slots get, per layer,
                      the K/V of the exit state through that layer's input norm and K/V projections
                      (`DecoderLayer.kv`, N small matmuls per token);
             copy     skipped as in project; the slots get copies of the exit loop's K/V.
           Row compaction (`compact_rows`, default on, for policies that exit early with skipped_kv
           "project" / "copy"): each loop runs only on the rows that need it (unfinished and not yet
           exited), gathered with their cache rows into the smallest bucket of `row_buckets(B)`
           (powers of two, then B) that holds them,
           chosen by `lax.switch` (static shapes: one compilation holds every bucket), and scattered
           back; an empty bucket skips the loop, the full bucket runs without gathering. Rows that
           exited or stopped then cost no layer compute. Without it a loop runs for the whole batch
           whenever some row needs it (exited rows ride along, their results discarded), and a fixed
           depth (full, or `exit_at_loop`) or "compute" runs its loops without conds: on CPU a cond
           costs a few µs, which only matters for tiny models. Either way the tokens are the same.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
import warnings
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.experimental import io_callback

from ouro_jax.inference.cache import SHARING, KVCache, fill_skipped
from ouro_jax.inference.policies import ExitPolicy
from ouro_jax.inference.sampling import row_keys, sample
from ouro_jax.model.exits import select_loop
from ouro_jax.model.layers import masked_attention, rope_cos_sin

EXIT_POLICIES = ("gate", "hidden_delta", "hidden_delta_relative")
SKIPPED_KV = ("compute", "project", "copy")  # the K/V of the loops a token skips (`generate`)
DEFAULT_SKIPPED_KV = "project"  # why: the `generate` docstring
DEFAULT_COMPACT_ROWS = True  # why: the `generate` docstring
FIRST_PHASE = 64  # decoded positions of the decode loop's first phase (`cache_phases`)


def cache_phases(max_new_tokens: int) -> tuple[int, ...]:
    """The decoded-token cache lengths of the decode loop's phases: FIRST_PHASE, doubling, then M
    (e.g. 64, 128, 200 for M = 200; one phase for M <= 65). Phase j runs the tokens whose cache position
    fits its length (positions 0..M-2 are written), so attention reads at most twice the positions filled
    so far instead of all M. Costs: one more compiled token step per phase, and each phase's slots are a
    new buffer (`KVCache.grow`), so the decode program's peak memory holds two phases' decoded-token
    slots at the switch (XLA's memory analysis, cpu_benchmark shape, batch 8, M = 1024: 99 MB against
    76 MB in one phase)."""
    lengths = [FIRST_PHASE]
    while lengths[-1] < max_new_tokens - 1:
        lengths.append(2 * lengths[-1])
    return (*lengths[:-1], max_new_tokens)


GATHER_SHARE = 4
"""`compact_rows`: a bucket of S rows gathers its cache slots for attention when S <= B / GATHER_SHARE;
a larger one attends over the whole batch's slots (its layers' matmuls still run on S rows only).
Gathering copies the slots (read, write, read again), so on a bandwidth-bound CPU it pays only for
small buckets: `python -m ouro_jax.benchmarks --bench=decode.rows --row_batches=8,32` (one core, the
other busy) at batch 32, gate x30, q = 0.7 / 0.4 took 0.85 / 0.82 of full depth's time with B / 4 and
1.00 / 0.96 gathering every bucket; B / 8 and B / 4 were alike at batch 8 (0.81-0.94)."""


def row_buckets(batch: int) -> tuple[int, ...]:
    """The bucket sizes of `compact_rows` for a batch of B rows: the powers of two below B, then B
    (e.g. 1, 2, 4, 5 for B = 5), so a bucket never holds more than twice the rows it needs."""
    return (*(1 << i for i in range((batch - 1).bit_length())), batch)


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """Static settings of one compiled generation (part of the compilation key). skipped_kv: the K/V of
    skipped loops (`SKIPPED_KV`; "copy" also under kv_sharing "last" / "average", where a decoded token
    has no per-loop slots to fill and skipped loops are never computed; "compute" for the "fixed" policy,
    which skips no loop); loop_logits: keep every
    loop's logits; stream: the decode loop reports every token to the `on_token` callback registered
    under `Knobs.stream_id`; compact_rows: each loop runs only on the rows that need it, gathered into a
    bucket of `row_buckets(B)` rows (`_decode_token`; never with "compute");
    cache_phases: the decoded-token cache length of each phase of the decode loop (`cache_phases`)."""

    policy: ExitPolicy
    kv_sharing: str
    skipped_kv: str
    max_new_tokens: int
    greedy: bool
    top_k: int | None
    top_p: bool
    pad_id: int
    loop_logits: bool
    stream: bool
    compact_rows: bool
    cache_phases: tuple[int, ...]


@struct.dataclass
class Knobs:
    """Traced settings (changing them never recompiles): exit threshold (q or eps), temperature, top_p
    (scalars), stop_tokens [S] int32 and stream_id (the key of the call's callback in `_STREAMS`)."""

    threshold: jax.Array
    temperature: jax.Array
    top_p: jax.Array
    stop_tokens: jax.Array
    stream_id: jax.Array


_STREAMS: dict[int, Callable] = {}  # stream_id -> on_token of a running generate call
_stream_ids = itertools.count()


def _emit(stream_id, index, tokens, exit_index, done):
    """Host side of streaming: on_token with 1-based exit loops (0 for rows that had stopped)."""
    _STREAMS[int(stream_id)](int(index), np.asarray(tokens), np.asarray(exit_index) + 1, np.asarray(done))


@struct.dataclass
class DecodeState:
    """The decode loop's carry.

    index: the next token index to produce (1..M); tokens [B, M] int32 (pad after a row stopped);
    exit_index [B, M] int32 the 0-based loop index each token came from (-1 after a row stopped);
    forced [B, M] int32 tokens fed back instead of `tokens` (teacher forcing) or None; done [B] bool;
    lengths [B] prompt lengths; keys [B] row PRNG keys; loops_run: loops the decode loop ran (scalar);
    row_loops_run: the batch rows those loops ran on, summed (scalar); loop_logits [M, T, B, V] float32
    or None.
    """

    index: jax.Array
    tokens: jax.Array
    forced: jax.Array | None
    exit_index: jax.Array
    done: jax.Array
    lengths: jax.Array
    keys: jax.Array
    cache: KVCache
    loops_run: jax.Array
    row_loops_run: jax.Array
    loop_logits: jax.Array | None


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
    per row (including its stop token); loop_logits [B, M, T, V] float32 every loop's logits of each
    token, loop t at index t - 1 (skipped loops repeat the exit loop's), only with
    `output_loop_logits=True`; cache: the final `KVCache` (on device)."""

    tokens: np.ndarray
    exit_loops: np.ndarray
    lengths: np.ndarray
    stats: GenerateStats
    cache: KVCache
    loop_logits: np.ndarray | None = None


# --- the layers, applied with a cache ---------------------------------------------------------------
def _apply_layers(layers, fn, x):
    """x -> fn(layers[i], x, i) in order -> (x, tuple of the N per-layer outputs, transposed)."""
    outs = []
    for i, layer in enumerate(layers):
        x, out = fn(layer, x, i)
        outs.append(out)
    return x, tuple(zip(*outs, strict=True))


def _on_rows_of_batch(attend, rows, batch, q, k, v, cached):
    """`attend` for rows `rows` [S] (indices >= batch: padding) over the whole batch's cache slots: q, k, v
    [S, 1, ., H] are spread into `batch` rows (zeros elsewhere), the rows' outputs kept -> [S, 1, Nq, H]."""
    def spread(x):
        return jnp.zeros((batch, *x.shape[1:]), x.dtype).at[rows].set(x, mode="drop")

    return jnp.take(attend(spread(q), spread(k), spread(v), cached=cached), rows, axis=0, mode="clip")


def _cached_attention(q, k, v, cached, prompt_valid, decoded_valid, scale):
    """The decode `Attend` hook: one new token over prompt, earlier decoded tokens and itself.

    q [B, 1, Nq, H]; k, v [B, 1, K, H] (its own, this loop); cached = (prompt_k, prompt_v [B, K, P, H],
    decoded_k, decoded_v [B, K, M, H]); prompt_valid [B, P], decoded_valid [M] bool. Scores and softmax
    in float32 over the three parts jointly -> [B, 1, Nq, H].
    """
    prompt_k, prompt_v, decoded_k, decoded_v = cached
    b, _, nq, h = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(b, kv_heads, nq // kv_heads, h)
    f32 = dict(preferred_element_type=jnp.float32)
    low = jnp.finfo(jnp.float32).min
    s_prompt = jnp.einsum("bkgh,bkph->bkgp", qg, prompt_k, **f32)
    s_prompt = jnp.where(prompt_valid[:, None, None, :], s_prompt, low)
    s_decoded = jnp.where(decoded_valid, jnp.einsum("bkgh,bkmh->bkgm", qg, decoded_k, **f32), low)
    s_self = jnp.einsum("bkgh,bkh->bkg", qg, k[:, 0], **f32)[..., None]
    probs = jax.nn.softmax(jnp.concatenate([s_prompt, s_decoded, s_self], -1) * scale, axis=-1)
    p, m = prompt_k.shape[2], decoded_k.shape[2]
    dtype = v.dtype
    context = (jnp.einsum("bkgp,bkph->bkgh", probs[..., :p].astype(dtype), prompt_v, **f32)
               + jnp.einsum("bkgm,bkmh->bkgh", probs[..., p:p + m].astype(dtype), decoded_v, **f32)
               + probs[..., p + m:] * v[:, 0, :, None, :].astype(jnp.float32))
    return context.reshape(b, 1, nq, h).astype(q.dtype)


# --- prefill ---------------------------------------------------------------------------------------
def _prefill(graphdef, spec: DecodeSpec, params, input_ids, lengths, keys, forced,
             knobs: Knobs) -> DecodeState:
    """All prompt tokens through all T loops; the first new token from the last position's exit loop."""
    model = nnx.merge(graphdef, params)
    cfg = model.config
    b, p = input_ids.shape
    num_loops, m = spec.policy.num_loops, spec.max_new_tokens
    index = jnp.arange(p)
    pad = (p - lengths)[:, None]
    valid = index[None] >= pad  # [B, P]
    mask = ((index[:, None] >= index[None]) & valid[:, None, :]) | jnp.eye(p, dtype=jnp.bool_)
    cos, sin = rope_cos_sin(jnp.maximum(index[None] - pad, 0), cfg.head_dim, cfg.rope_theta,
                            cfg.compute_jnp_dtype)
    attend = masked_attention(cfg, mask[:, None])

    def layer_fn(layer, x, _):
        x, (k, v) = layer.with_kv(x, cos, sin, attend)
        return x, (k.swapaxes(1, 2), v.swapaxes(1, 2))  # [B, K, P, H]

    layers = [layer.fuse() for layer in model.unstacked_layers()]
    h, ks, vs, last, gates = model.embed(input_ids), [], [], [], []
    for _ in range(num_loops):
        h, (k, v) = _apply_layers(layers, layer_fn, h)
        h = model.norm(h)
        ks.append(k)
        vs.append(v)
        last.append(h[:, -1])
        gates.append(model.gate_logit(h[:, -1:])[:, 0])
    last, gates = jnp.stack(last), jnp.stack(gates)  # [T, B, D], [T, B]
    exit_index = spec.policy.first_exit(last, gates, knobs.threshold)
    logits = model.logits(select_loop(last, exit_index)[:, None])[:, 0]
    token = sample(logits, keys, 0, greedy=spec.greedy, temperature=knobs.temperature, top_k=spec.top_k,
                   top_p=knobs.top_p if spec.top_p else None)
    loop_logits = None
    if spec.loop_logits:
        loop_logits = jnp.zeros((m, num_loops, b, cfg.vocab_size), jnp.float32).at[0].set(
            model.logits(last[:, :, None])[:, :, 0])
    return DecodeState(
        index=jnp.int32(1),
        tokens=jnp.full((b, m), spec.pad_id, jnp.int32).at[:, 0].set(token), forced=forced,
        exit_index=jnp.full((b, m), -1, jnp.int32).at[:, 0].set(exit_index),
        done=jnp.isin(token, knobs.stop_tokens),
        lengths=lengths, keys=keys, cache=KVCache.create(ks, vs, spec.cache_phases[0], spec.kv_sharing),
        loops_run=jnp.int32(0), row_loops_run=jnp.int32(0), loop_logits=loop_logits)


# --- decode ----------------------------------------------------------------------------------------
def _decode_token(model, layers, spec: DecodeSpec, state: DecodeState, threshold):
    """Run token `state.index - 1` (fed back at position index - 1) through its adaptive recurrence.

    The T loops are unrolled (each reads its own cache slots). A row needs loop index t while it is
    unfinished and has not exited before t. With skipped_kv "compute" (which a fixed depth runs as)
    every loop runs for every row. Otherwise, uncompacted, loop index t > 0 runs for the whole batch under
    `lax.cond` only while some row needs it: rows that do not need it ride along and their results
    are discarded. With `spec.compact_rows` the needed rows are gathered into the smallest
    bucket of `row_buckets(B)` that holds them (`lax.switch` over the bucket sizes; an empty bucket
    skips the loop, the full one runs without gathering), the layers run on the bucket only (its rows'
    h, RoPE tables, prompt masks and cache slots) and the results are scattered back. Either way each
    row's exit state is frozen at its exit loop; the state h of a row that does not run a loop is
    don't-care after its exit.
    Returns (logits [B, V] of each row's exit loop, exit_index [B], k, v [T, N, B, K, H] per loop with
    the skipped loops filled by `spec.skipped_kv`, loops run (scalar: loops some row ran), row-loops run
    (scalar: the batch rows the loops ran on, bucket padding included), per-loop logits [T, B, V] or None).
    """
    cfg = model.config
    cache, position = state.cache, state.index - 1
    fed = state.tokens if state.forced is None else state.forced
    tokens = jax.lax.dynamic_index_in_dim(fed, position, axis=1, keepdims=True)  # [B, 1]
    b, p = tokens.shape[0], cache.prompt_k[0].shape[2]
    cos, sin = rope_cos_sin(state.lengths[:, None] + position, cfg.head_dim, cfg.rope_theta,
                            cfg.compute_jnp_dtype)
    prompt_valid = jnp.arange(p)[None] >= (p - state.lengths)[:, None]
    decoded_valid = jnp.arange(cache.decoded_length) < position

    def layers_on(t, h, rows=None):
        """The N layers of loop index t on rows `rows` [S] int32 of the batch (None: all B; indices
        >= B are padding, computed on row B - 1) of h [B, 1, D] -> (normed [S, 1, D], k, v [N, S, K, H]).
        Attention gathers the rows' cache slots when S <= B / GATHER_SHARE, else it runs over the
        whole batch's slots (q, k, v of the other rows zero) and keeps the rows' outputs."""
        pick = (lambda x: x) if rows is None else (lambda x: jnp.take(x, rows, axis=0, mode="clip"))
        gather = rows is not None and rows.shape[0] * GATHER_SHARE <= b
        pick_cache = pick if gather else (lambda x: x)  # the rows' cache slots and prompt masks
        attend = functools.partial(_cached_attention, prompt_valid=pick_cache(prompt_valid),
                                   decoded_valid=decoded_valid, scale=cfg.head_dim ** -0.5)
        if rows is not None and not gather:
            attend = functools.partial(_on_rows_of_batch, attend, rows, b)
        row_cos, row_sin = pick(cos), pick(sin)

        def layer_fn(layer, x, i):
            cached = tuple(pick_cache(c) for c in (*cache.prompt(t, i), *cache.decoded(t, i)))
            x, (k, v) = layer.with_kv(x, row_cos, row_sin, functools.partial(attend, cached=cached))
            return x, (k[:, 0], v[:, 0])

        x, (k, v) = _apply_layers(layers, layer_fn, pick(h))
        return model.norm(x), jnp.stack(k), jnp.stack(v)

    sizes = row_buckets(b) if spec.compact_rows else (b,)

    def on_bucket(t, size, needed, h):
        """Loop index t on the first `size` rows where `needed` [B] (size 0: none, size B: all rows)
        -> (h [B, 1, D] with those rows advanced, k, v [N, B, K, H], zero on the other rows)."""
        kv_zeros = jnp.zeros((cfg.num_hidden_layers, b, cfg.num_key_value_heads, cfg.head_dim), h.dtype)
        if size == 0:
            return h, kv_zeros, kv_zeros
        if size == b:
            return layers_on(t, h)
        rows = jnp.nonzero(needed, size=size, fill_value=b)[0]
        h_rows, k, v = layers_on(t, h, rows)
        return (h.at[rows].set(h_rows, mode="drop"), kv_zeros.at[:, rows].set(k, mode="drop"),
                kv_zeros.at[:, rows].set(v, mode="drop"))

    def run_loop(t, carry):
        h, h_exit, exited, exit_index, policy_state, loops_run, row_loops = carry
        needed = ~exited  # unfinished rows that have not exited yet
        if spec.compact_rows:  # the smallest bucket holding every needed row (0: skip the loop)
            bounds = jnp.asarray((0, *sizes), jnp.int32)
            bucket = jnp.sum(bounds < jnp.sum(needed, dtype=jnp.int32))
            h, k, v = jax.lax.switch(bucket, [functools.partial(on_bucket, t, size, needed)
                                              for size in (0, *sizes)], h)
            ran = bounds[bucket]
        # Loop 1 always runs (some row is unfinished, else the token loop has stopped), and so does
        # every loop of "compute" (also a fixed depth's, `_settings`): no cond (and its cost) there.
        elif t == 0 or spec.skipped_kv == "compute":
            (h, k, v), ran = layers_on(t, h), jnp.int32(b)
        else:
            h, k, v = jax.lax.cond(jnp.any(needed), lambda h: layers_on(t, h),
                                   functools.partial(on_bucket, t, 0, needed), h)
            ran = jnp.where(jnp.any(needed), b, 0).astype(jnp.int32)
        exit_now, policy_state = spec.policy.update(policy_state, t, h[:, 0], model.gate_logit(h)[:, 0],
                                                    threshold)
        running = ~exited
        carry = (h, jnp.where(running[:, None, None], h, h_exit), exited | exit_now,
                 jnp.where(running, t, exit_index), policy_state, loops_run + (ran > 0), row_loops + ran)
        return carry, (k, v, model.logits(h)[:, 0] if spec.loop_logits else None)

    x = model.embed(tokens)
    carry = (x, x, state.done, jnp.zeros((b,), jnp.int32), spec.policy.init(x[:, 0]), jnp.int32(0),
             jnp.int32(0))
    outputs = [None] * spec.policy.num_loops
    for t in range(spec.policy.num_loops):
        carry, outputs[t] = run_loop(t, carry)
    _, h_exit, _, exit_index, _, loops_run, row_loops = carry
    k, v, loop_logits = (None if per_loop[0] is None else jnp.stack(per_loop)
                         for per_loop in zip(*outputs, strict=True))
    if spec.skipped_kv == "copy":
        k, v = fill_skipped(k, exit_index, 2), fill_skipped(v, exit_index, 2)
    elif spec.skipped_kv == "project":  # every skipped loop gets the K/V of the exit state, per layer
        projected = [layer.kv(h_exit, cos, sin) for layer in layers]
        k, v = (fill_skipped(x, exit_index, 2, jnp.stack([kv[i][:, 0] for kv in projected]))
                for i, x in enumerate((k, v)))
    if loop_logits is not None and spec.skipped_kv != "compute":
        loop_logits = fill_skipped(loop_logits, exit_index, 1)
    return model.logits(h_exit)[:, 0], exit_index, k, v, loops_run, row_loops, loop_logits


def _decode(graphdef, spec: DecodeSpec, params, state: DecodeState, knobs: Knobs) -> DecodeState:
    """Generate tokens 1..M-1 (`lax.while_loop`, stops early once every row is done)."""
    model = nnx.merge(graphdef, params)
    layers = [layer.fuse() for layer in model.unstacked_layers()]

    def body(s: DecodeState) -> DecodeState:
        logits, exit_index, k, v, loops_run, row_loops, loop_logits = _decode_token(model, layers, spec, s,
                                                                                     knobs.threshold)
        token = sample(logits, s.keys, s.index, greedy=spec.greedy, temperature=knobs.temperature,
                       top_k=spec.top_k, top_p=knobs.top_p if spec.top_p else None)
        token = jnp.where(s.done, spec.pad_id, token)
        exit_index = jnp.where(s.done, -1, exit_index)
        if spec.stream:
            io_callback(_emit, None, knobs.stream_id, s.index, token, exit_index, s.done, ordered=True)
        return s.replace(
            index=s.index + 1,
            tokens=s.tokens.at[:, s.index].set(token),
            exit_index=s.exit_index.at[:, s.index].set(exit_index),
            done=s.done | jnp.isin(token, knobs.stop_tokens),
            cache=s.cache.write(s.index - 1, k, v, exit_index),
            loops_run=s.loops_run + loops_run, row_loops_run=s.row_loops_run + row_loops,
            loop_logits=None if loop_logits is None else s.loop_logits.at[s.index].set(loop_logits))

    for length in spec.cache_phases:  # token index i writes decoded position i - 1; the last is M - 1
        last = min(length, spec.max_new_tokens - 1)
        state = jax.lax.while_loop(lambda s, last=last: (s.index <= last) & ~jnp.all(s.done),
                                   body, state.replace(cache=state.cache.grow(length)))
    return state


# --- compilation cache and running ------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def _compile(fn, graphdef, spec: DecodeSpec, treedef, leaves):
    args = jax.tree.unflatten(treedef, leaves)
    donate = (3,) if fn is _decode else ()  # the decode loop updates the prefill's cache in place
    with warnings.catch_warnings():  # the first phase's decode slots are donated but outgrown (`_decode`)
        warnings.filterwarnings("ignore", "Some donated buffers were not usable")
        lowered = jax.jit(fn, static_argnums=(0, 1), donate_argnums=donate).lower(graphdef, spec, *args)
        return lowered.compile()


def _run(fn, graphdef, spec, *args):
    """Compile (cached by shapes and static settings) and run `fn`; returns (out, run_s, compile_s)."""
    leaves, treedef = jax.tree.flatten(args)
    start = time.perf_counter()
    hits = _compile.cache_info().hits
    compiled = _compile(fn, graphdef, spec, treedef,
                        tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves))
    compile_s = 0.0 if _compile.cache_info().hits > hits else time.perf_counter() - start
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    return out, time.perf_counter() - start, compile_s


def _execute(model, spec: DecodeSpec, knobs: Knobs, ids, lengths, seeds, forced,
             on_token) -> tuple[DecodeState, float, float, float]:
    """Prefill, then the decode loop (streaming to `on_token` when given).
    Returns (final state, prefill_s, decode_s, compile_s)."""
    graphdef, params = nnx.split(model)
    # The prefill computes every loop for every row: these settings do not change it (nor recompile it).
    prefill_spec = dataclasses.replace(spec, skipped_kv=DEFAULT_SKIPPED_KV, compact_rows=False)
    state, prefill_s, compile_prefill = _run(
        _prefill, graphdef, prefill_spec, params, jnp.asarray(ids), jnp.asarray(lengths),
        row_keys(jnp.asarray(seeds)), None if forced is None else jnp.asarray(forced), knobs)
    stream_id = int(knobs.stream_id)
    if on_token is not None:
        on_token(0, np.asarray(state.tokens[:, 0]), np.asarray(state.exit_index[:, 0]) + 1,
                 np.zeros(ids.shape[0], bool))
        _STREAMS[stream_id] = on_token
    try:
        state, decode_s, compile_decode = _run(_decode, graphdef, spec, params, state, knobs)
    finally:
        _STREAMS.pop(stream_id, None)
    return state, prefill_s, decode_s, compile_prefill + compile_decode


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


def _policy(num_loops, exit_threshold, exit_at_loop, exit_policy, hidden_delta_eps):
    """(ExitPolicy, threshold) from generate's exit arguments, validated."""
    if exit_policy not in EXIT_POLICIES:
        raise ValueError(f"exit_policy={exit_policy!r} must be one of {EXIT_POLICIES}")
    if exit_at_loop is not None:
        if exit_threshold is not None or exit_policy != "gate":
            raise ValueError("exit_at_loop fixes the depth: do not combine it with exit_threshold or a "
                             "hidden_delta exit_policy")
        if not 1 <= exit_at_loop <= num_loops:
            raise ValueError(f"exit_at_loop={exit_at_loop} must lie in [1, {num_loops}]")
        return ExitPolicy("fixed", exit_at_loop), 0.0
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
    policy, threshold = _policy(config.total_ut_steps, exit_threshold, exit_at_loop, exit_policy,
                                hidden_delta_eps)
    greedy = temperature == 0
    # A fixed depth skips none of the loops it runs (the cache holds just those), so it has nothing to
    # fill: "compute" names that, and spares every decode step the "project" fill's N K/V projections.
    skipped_kv = "compute" if policy.kind == "fixed" else skipped_kv if kv_sharing == "none" else "copy"
    spec = DecodeSpec(policy=policy, kv_sharing=kv_sharing, skipped_kv=skipped_kv,
                      max_new_tokens=max_new_tokens, greedy=greedy,
                      top_k=None if greedy else top_k, top_p=not greedy and top_p is not None,
                      pad_id=pad_id, loop_logits=output_loop_logits, stream=stream,
                      compact_rows=compact_rows and skipped_kv != "compute",
                      cache_phases=cache_phases(max_new_tokens))
    knobs = Knobs(*(jnp.float32(x) for x in (threshold, temperature if not greedy else 1.0,
                                              1.0 if top_p is None else top_p)),
                  stop_tokens=jnp.asarray(_padded(stop_tokens), jnp.int32),
                  stream_id=jnp.int32(next(_stream_ids)))
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
      exit_policy: "gate" (Q-exit), "hidden_delta" (the paper's rule, §5.4.1: exit once
        ||h_t - h_{t-1}||_2 < hidden_delta_eps, from loop 2 on; h_t is the normed state, so eps is in
        units of ||h||, about sqrt(D) for unit RMS) or "hidden_delta_relative" (exit once
        ||h_t - h_{t-1}||_2 < hidden_delta_eps * ||h_{t-1}||_2); see `policies.py`.
      kv_sharing: "none" | "last" | "average" decode-time KV sharing (`cache.py`).
      skipped_kv: what later tokens read at the loops an early-exiting token skipped (kv_sharing
        "none"; with sharing a decoded token has one entry per layer and skipped loops never run):
        "compute" runs every loop for every token and uses the exit only to pick the logits, exactly the
        released code (identical tokens to the exported PyTorch model's `generate(exit_threshold=q)`),
        but saves no compute; "project" skips the loops and fills their slots with each layer's K/V of
        the exit state (input norm + K/V projections, as CALM does for skipped layers); "copy" skips
        them and fills them with the exit loop's K/V. Default "project": on the trained p-hop demo
        (`python -m ouro_jax.benchmarks --bench=decode.exit`, q = 0.9 / 0.5 / 0.2) its answers agreed
        100 % with "compute" at every q (copy: 99.4-99.7 %, up to 0.5 points less accurate) while
        running 0.76-0.84 of the loops at q = 0.2 (compute: all); at the cpu_benchmark shape with
        random weights (batch 1, 2026-12-01) it saved 30-47 % of decode time (copy 41-57 %; compute
        none: 6-11 % more than full depth). A fixed depth (full, or `exit_at_loop`) skips no loop, so
        this setting does not change it, and it pays for no fill (batch-1 decode was 11-22 % faster
        once the full depth stopped computing the unused "project" fill; same tokens).
      compact_rows: run each loop only on the rows that need it (not yet exited and unfinished),
        gathered into a bucket of a power-of-two size (or B) rows with their cache rows and scattered
        back, so that rows that exited or stopped cost no layer compute (`_decode_token`). The same
        tokens as without it. Off: every loop some row needs runs for the whole batch. It does not
        apply to skipped_kv "compute" (every loop runs for every row by definition) nor to a fixed
        depth (full, or `exit_at_loop`: no row exits early), which then run uncompacted. Default
        on: at the cpu_benchmark shape (random weights, gate x10 / x30, q = 0.7 / 0.4,
        `python -m ouro_jax.benchmarks --bench=decode.rows --row_batches=8,32`, one run on one core,
        the other busy) it took 0.78-0.86 of full depth's decode time at batch 32 (uncompacted
        0.94-0.96) and 0.82-0.92 at batch 8 (uncompacted 1.00-1.04); at batch 1 it is the uncompacted
        computation. The time does not fall as fast as the executed row-loops (0.56-0.70 at batch
        32): attention reads every row's cache slots for buckets of more than B / 4 rows
        (`GATHER_SHARE`), and the LM head, the cache writes and the K/V fill run for every row. It
        costs compilation time: one copy of the N layers per bucket size and loop.
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
