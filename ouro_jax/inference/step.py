"""The decoding engine's core: a jitted prefill, one decoded token's adaptive recurrence, and the
`generate` decode loop over it (functional: the model is `nnx.split` once, the jitted functions take
its params).

Shapes: B batch, P prompt length, M = max_new_tokens, T loops that may run, N layers, D hidden,
K kv heads, H head_dim, V vocab. Loops are 0-based loop indices t here (t = 0 is loop 1); `exit_index`
is such an index, -1 where no token was generated.

Both phases run the model's own decoder layers (`DecoderLayer.with_kv`, which also returns each layer's
k, v), sliced off the stack and fused (`DecoderLayer.fuse`: one q/k/v and one gate/up matmul) once
outside the loops; only the layers' `attend` hook differs:
  prefill  all prompt tokens through all T loops with `masked_attention` under the left-padding mask
           (the prompt keeps every (loop, layer) K/V, see `cache.py`); the first new token comes from
           the last position at its exit loop (the policy applied to the already computed loops:
           prefill saves no compute).
  decode   `lax.while_loop` over tokens (`decode_loop`), stopping when all rows are done or M tokens
           exist; each token is `decode_token` with `attention.cached_attention` over the cache. The
           loop runs in phases (`cache_phases`): the decoded-token slots grow from FIRST_PHASE
           positions, doubling, to M. A token's T loops are unrolled (each loop addresses its own cache
           slots statically; a dynamic loop index would copy the loop's whole cache slice each time).
           The exit policy (`policies.py`) picks each row's exit loop, whose state (hence logits) is
           frozen there (policy "sample" draws it: `exit_threshold`), and gives its log-probability
           under the gate's exit distribution. What the loops after it do is `skipped_kv`
           (`SKIPPED_KV`, with kv_sharing "none"; a fixed depth skips none of the loops it runs, so it
           runs as "compute"):
             compute  every loop runs for every row, so every (loop, layer) slot holds real K/V: the
                      released code's semantics, no compute saved;
             project  loop index t > 0 runs under `lax.cond` only while some unfinished row has not
                      exited; a skipped loop's slots get, per layer, the K/V of the exit state through
                      that layer's input norm and K/V projections (`DecoderLayer.kv`);
             copy     skipped as in project; the slots get copies of the exit loop's K/V.
           With `compact_rows` each loop runs only on the rows that need it (`compaction.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
import warnings
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.experimental import io_callback

from ouro_jax.inference.attention import apply_layers, cached_attention, on_rows_of_batch
from ouro_jax.inference.cache import KVCache, fill_skipped
from ouro_jax.inference.compaction import compacted_loop, gathers, skippable_loop
from ouro_jax.inference.policies import ExitPolicy
from ouro_jax.inference.sampling import exit_uniforms, sample
from ouro_jax.model.exits import log_exit_pdf, select_loop
from ouro_jax.model.layers import masked_attention, rope_cos_sin

SKIPPED_KV = ("compute", "project", "copy")  # the K/V of the loops a token skips (`generate`)
FIRST_PHASE = 64  # decoded positions of the decode loop's first phase (`cache_phases`)


def cache_phases(max_new_tokens: int) -> tuple[int, ...]:
    """The decoded-token cache lengths of the decode loop's phases: FIRST_PHASE, doubling, then M
    (e.g. 64, 128, 200 for M = 200; one phase for M <= 65). Phase j runs the tokens whose cache position
    fits its length (positions 0..M-2 are written), so attention reads at most twice the positions filled
    so far instead of all M. Costs: one more compiled token step per phase, and each phase's slots are a
    new buffer (`KVCache.grow`), so the decode program's peak memory holds two phases' decoded-token
    slots at the switch (`python -m ouro_jax.benchmarks --bench=decode.split` reports the programs'
    memory)."""
    lengths = [FIRST_PHASE]
    while lengths[-1] < max_new_tokens - 1:
        lengths.append(2 * lengths[-1])
    return (*lengths[:-1], max_new_tokens)


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """Static settings of one compiled generation (part of the compilation key). skipped_kv: the K/V of
    skipped loops (`SKIPPED_KV`; "copy" also under kv_sharing "last" / "average", where a decoded token
    has no per-loop slots to fill and skipped loops are never computed; "compute" for the "fixed" policy,
    which skips no loop); keep_loop_logits: keep every loop's logits (`DecodeState.loop_logits`); stream:
    the decode loop reports every token to the `on_token` callback registered under `Knobs.stream_id`;
    compact_rows: each loop runs only on the rows that need it (`compaction.py`; never with "compute");
    cache_phases: the decoded-token cache length of each phase of the decode loop (`cache_phases`)."""

    policy: ExitPolicy
    kv_sharing: str
    skipped_kv: str
    max_new_tokens: int
    greedy: bool
    top_k: int | None
    top_p: bool
    pad_id: int
    keep_loop_logits: bool
    stream: bool
    compact_rows: bool
    cache_phases: tuple[int, ...]


@struct.dataclass
class Knobs:
    """Traced settings (changing them never recompiles): exit threshold (q or eps), temperature, top_p
    (scalars), stop_tokens [S] int32 and stream_id (the key of the call's callback in `STREAMS`)."""

    threshold: jax.Array
    temperature: jax.Array
    top_p: jax.Array
    stop_tokens: jax.Array
    stream_id: jax.Array


STREAMS: dict[int, Callable] = {}  # stream_id -> on_token of a running generate call
stream_ids = itertools.count()


def _emit(stream_id, index, tokens, exit_index, done):
    """Host side of streaming: on_token with 1-based exit loops (0 for rows that had stopped)."""
    STREAMS[int(stream_id)](int(index), np.asarray(tokens), np.asarray(exit_index) + 1, np.asarray(done))


@struct.dataclass
class DecodeState:
    """The decode loop's carry.

    index: the next token index to produce (1..M); tokens [B, M] int32 (pad after a row stopped);
    exit_index [B, M] int32 the 0-based loop index each token came from (-1 after a row stopped);
    logprobs [B, M] float32 each token's log-probability under the distribution it was sampled from
    (`sampling.sample`; 0 after a row stopped); exit_logprobs [B, M] float32 the log-probability of each
    token's exit loop under the gate's exit distribution (0 after a row stopped);
    forced [B, M] int32 tokens fed back instead of `tokens` (teacher forcing) or None; done [B] bool;
    lengths [B] prompt lengths; keys [B] row PRNG keys; loops_run: loops the decode loop ran (scalar);
    row_loops_run: the batch rows those loops ran on, summed (scalar); loop_logits [M, T, B, V] float32
    or None.
    """

    index: jax.Array
    tokens: jax.Array
    logprobs: jax.Array
    exit_logprobs: jax.Array
    forced: jax.Array | None
    exit_index: jax.Array
    done: jax.Array
    lengths: jax.Array
    keys: jax.Array
    cache: KVCache
    loops_run: jax.Array
    row_loops_run: jax.Array
    loop_logits: jax.Array | None


def fused_layers(model) -> list:
    """The model's N decoder layers, sliced off the stack and fused (`DecoderLayer.fuse`)."""
    return [layer.fuse() for layer in model.unstacked_layers()]


# --- prefill ---------------------------------------------------------------------------------------
def prompt_loops(model, input_ids, lengths, num_loops: int):
    """Left-padded prompts input_ids [B, P] with `lengths` [B] real tokens through `num_loops` loops
    -> (k, v nested [t][l] lists of [B, K, P, H], the last position's normed states [T, B, D], its gate
    logits [T, B])."""
    cfg = model.config
    p = input_ids.shape[1]
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

    layers = fused_layers(model)
    h, ks, vs, last, gates = model.embed(input_ids), [], [], [], []
    for _ in range(num_loops):
        h, (k, v) = apply_layers(layers, layer_fn, h)
        h = model.norm(h)
        ks.append(k)
        vs.append(v)
        last.append(h[:, -1])
        gates.append(model.gate_logit(h[:, -1:])[:, 0])
    return ks, vs, jnp.stack(last), jnp.stack(gates)


def exit_threshold(policy: ExitPolicy, threshold, keys, index):
    """The threshold the exit policy reads for generated token `index` (scalar or [B]): the traced knob,
    or with policy "sample" each row's uniform draw (`sampling.exit_uniforms`, keys [B]) -> [B]."""
    return exit_uniforms(keys, index) if policy.kind == "sample" else threshold


def first_token_exit(policy: ExitPolicy, last, gates, threshold) -> tuple[jax.Array, jax.Array]:
    """The exit of the token read at the prompt's last position, whose every loop ran: last [T, B, D]
    normed states, gates [T, B] -> (exit loop index [B] int32, its log-probability [B] float32)."""
    exit_index = policy.first_exit(last, gates, threshold)
    return exit_index, select_loop(log_exit_pdf(gates), exit_index)


def prefill(graphdef, spec: DecodeSpec, params, input_ids, lengths, keys, forced,
            knobs: Knobs) -> DecodeState:
    """All prompt tokens through all T loops; the first new token from the last position's exit loop."""
    model = nnx.merge(graphdef, params)
    cfg = model.config
    b = input_ids.shape[0]
    num_loops, m = spec.policy.num_loops, spec.max_new_tokens
    ks, vs, last, gates = prompt_loops(model, input_ids, lengths, num_loops)
    exit_index, exit_logprob = first_token_exit(spec.policy, last, gates,
                                                exit_threshold(spec.policy, knobs.threshold, keys, 0))
    logits = model.logits(select_loop(last, exit_index)[:, None])[:, 0]
    token, logprob = sample(logits, keys, 0, greedy=spec.greedy, temperature=knobs.temperature,
                            top_k=spec.top_k, top_p=knobs.top_p if spec.top_p else None)
    loop_logits = None
    if spec.keep_loop_logits:
        loop_logits = jnp.zeros((m, num_loops, b, cfg.vocab_size), jnp.float32).at[0].set(
            model.logits(last[:, :, None])[:, :, 0])
    return DecodeState(
        index=jnp.int32(1),
        tokens=jnp.full((b, m), spec.pad_id, jnp.int32).at[:, 0].set(token),
        logprobs=jnp.zeros((b, m), jnp.float32).at[:, 0].set(logprob),
        exit_logprobs=jnp.zeros((b, m), jnp.float32).at[:, 0].set(exit_logprob), forced=forced,
        exit_index=jnp.full((b, m), -1, jnp.int32).at[:, 0].set(exit_index),
        done=jnp.isin(token, knobs.stop_tokens),
        lengths=lengths, keys=keys, cache=KVCache.create(ks, vs, spec.cache_phases[0], spec.kv_sharing),
        loops_run=jnp.int32(0), row_loops_run=jnp.int32(0), loop_logits=loop_logits)


# --- one decoded token -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TokenInputs:
    """What every loop of one decoded token reads: the model and its fused layers, the cache, the RoPE
    tables cos, sin [B, 1, H] of the token's position, prompt_valid [B, P] and decoded_valid [B, M]."""

    model: nnx.Module
    layers: list
    cache: KVCache
    cos: jax.Array
    sin: jax.Array
    prompt_valid: jax.Array
    decoded_valid: jax.Array

    @classmethod
    def at(cls, model, layers, cache: KVCache, lengths, decoded) -> TokenInputs:
        """For a token after `lengths` [B] prompt and `decoded` [B] decoded tokens (its cache position)."""
        cfg = model.config
        p = cache.prompt_k[0].shape[2]
        cos, sin = rope_cos_sin((lengths + decoded)[:, None], cfg.head_dim, cfg.rope_theta,
                                cfg.compute_jnp_dtype)
        prompt_valid = jnp.arange(p)[None] >= (p - lengths)[:, None]
        decoded_valid = jnp.arange(cache.decoded_length)[None] < decoded[:, None]
        return cls(model, layers, cache, cos, sin, prompt_valid, decoded_valid)

    def run_layers(self, t: int, h, rows=None):
        """The N layers of loop index t on rows `rows` [S] int32 of the batch (None: all B; indices >= B
        are padding, computed on row B - 1) of h [B, 1, D] -> (normed [S, 1, D], k, v [N, S, K, H]).
        Attention gathers the rows' cache slots when `compaction.gathers`, else it runs over the whole
        batch's slots (q, k, v of the other rows zero) and keeps the rows' outputs."""
        b = h.shape[0]
        pick = (lambda x: x) if rows is None else (lambda x: jnp.take(x, rows, axis=0, mode="clip"))
        gather = rows is not None and gathers(rows.shape[0], b)
        pick_cache = pick if gather else (lambda x: x)  # the rows' cache slots and masks
        attend = functools.partial(cached_attention, prompt_valid=pick_cache(self.prompt_valid),
                                   decoded_valid=pick_cache(self.decoded_valid),
                                   scale=self.model.config.head_dim ** -0.5)
        if rows is not None and not gather:
            attend = functools.partial(on_rows_of_batch, attend, rows, b)
        cos, sin = pick(self.cos), pick(self.sin)

        def layer_fn(layer, x, i):
            cached = tuple(pick_cache(c) for c in (*self.cache.prompt(t, i), *self.cache.decoded(t, i)))
            x, (k, v) = layer.with_kv(x, cos, sin, functools.partial(attend, cached=cached))
            return x, (k[:, 0], v[:, 0])

        x, (k, v) = apply_layers(self.layers, layer_fn, pick(h))
        return self.model.norm(x), jnp.stack(k), jnp.stack(v)


class LoopCarry(NamedTuple):
    """The state of a token between its loops: h [B, 1, D] the running state, h_exit [B, 1, D] each
    row's state at its exit loop, exited [B] bool (exited or finished), exit_index [B], exit_logprob [B]
    the log-probability of exiting at exit_index (`ExitPolicy.exit_logprob`), policy_state, loops_run
    (scalar: loops some row ran), row_loops (scalar: the rows they ran on)."""

    h: jax.Array
    h_exit: jax.Array
    exited: jax.Array
    exit_index: jax.Array
    exit_logprob: jax.Array
    policy_state: tuple
    loops_run: jax.Array
    row_loops: jax.Array


def run_loop(inputs: TokenInputs, spec: DecodeSpec, t: int, carry: LoopCarry, threshold):
    """Loop index t for the rows that need it (unfinished, not yet exited), then the exit policy.
    Returns (carry, (k, v [N, B, K, H], logits [B, V] or None))."""
    model, cfg = inputs.model, inputs.model.config
    h, needed = carry.h, ~carry.exited
    kv_shape = (cfg.num_hidden_layers, h.shape[0], cfg.num_key_value_heads, cfg.head_dim)
    run = functools.partial(inputs.run_layers, t)
    if spec.compact_rows:
        h, k, v, ran = compacted_loop(run, needed, h, kv_shape)
    # Loop 1 always runs (some row is unfinished, else the token loop has stopped), and so does every
    # loop of "compute" (also a fixed depth's): no cond (and its cost) there.
    elif t == 0 or spec.skipped_kv == "compute":
        (h, k, v), ran = run(h), jnp.int32(h.shape[0])
    else:
        h, k, v, ran = skippable_loop(run, needed, h, kv_shape)
    gate_logit = model.gate_logit(h)[:, 0]
    exit_logprob = spec.policy.exit_logprob(carry.policy_state, t, gate_logit)
    exit_now, policy_state = spec.policy.update(carry.policy_state, t, h[:, 0], gate_logit, threshold)
    carry = LoopCarry(h, jnp.where(needed[:, None, None], h, carry.h_exit), carry.exited | exit_now,
                      jnp.where(needed, t, carry.exit_index),
                      jnp.where(needed, exit_logprob, carry.exit_logprob), policy_state,
                      carry.loops_run + (ran > 0), carry.row_loops + ran)
    return carry, (k, v, model.logits(h)[:, 0] if spec.keep_loop_logits else None)


def fill_skipped_loops(inputs: TokenInputs, skipped_kv: str, k, v, h_exit, exit_index):
    """k, v [T, N, B, K, H] with the loops after each row's exit filled as `skipped_kv` says."""
    if skipped_kv == "copy":
        return fill_skipped(k, exit_index, 2), fill_skipped(v, exit_index, 2)
    if skipped_kv == "project":  # every skipped loop gets the K/V of the exit state, per layer
        projected = [layer.kv(h_exit, inputs.cos, inputs.sin) for layer in inputs.layers]
        return tuple(fill_skipped(x, exit_index, 2, jnp.stack([kv[i][:, 0] for kv in projected]))
                     for i, x in enumerate((k, v)))
    return k, v


class TokenOut(NamedTuple):
    """One decoded token: logits [B, V] of each row's exit loop, exit_index [B], exit_logprob [B] its
    log-probability under the gate's exit distribution, k, v [T, N, B, K, H] (skipped loops filled),
    loops_run and row_loops (scalars), loop_logits [T, B, V] or None."""

    logits: jax.Array
    exit_index: jax.Array
    exit_logprob: jax.Array
    k: jax.Array
    v: jax.Array
    loops_run: jax.Array
    row_loops: jax.Array
    loop_logits: jax.Array | None


def decode_token(inputs: TokenInputs, spec: DecodeSpec, tokens, done, threshold) -> TokenOut:
    """tokens [B, 1] (fed back) through their adaptive recurrence; rows `done` [B] run no loop; threshold:
    the exit policy's, scalar or [B] (`exit_threshold`).

    The T loops are unrolled (each reads its own cache slots); each row's exit state is frozen at its
    exit loop (`run_loop`); the state h of a row that does not run a loop is don't-care after its exit.
    """
    x = inputs.model.embed(tokens)
    carry = LoopCarry(x, x, done, jnp.zeros(done.shape, jnp.int32), jnp.zeros(done.shape, jnp.float32),
                      spec.policy.init(x[:, 0]), jnp.int32(0), jnp.int32(0))
    outputs = []
    for t in range(spec.policy.num_loops):
        carry, out = run_loop(inputs, spec, t, carry, threshold)
        outputs.append(out)
    k, v, loop_logits = (None if per_loop[0] is None else jnp.stack(per_loop)
                         for per_loop in zip(*outputs, strict=True))
    k, v = fill_skipped_loops(inputs, spec.skipped_kv, k, v, carry.h_exit, carry.exit_index)
    if loop_logits is not None and spec.skipped_kv != "compute":
        loop_logits = fill_skipped(loop_logits, carry.exit_index, 1)
    return TokenOut(inputs.model.logits(carry.h_exit)[:, 0], carry.exit_index, carry.exit_logprob, k, v,
                    carry.loops_run, carry.row_loops, loop_logits)


# --- the decode loop -------------------------------------------------------------------------------
def decode_loop(graphdef, spec: DecodeSpec, params, state: DecodeState, knobs: Knobs) -> DecodeState:
    """Generate tokens 1..M-1 (`lax.while_loop`, stops early once every row is done)."""
    model = nnx.merge(graphdef, params)
    layers = fused_layers(model)

    def body(s: DecodeState) -> DecodeState:
        position = s.index - 1
        fed = s.tokens if s.forced is None else s.forced
        tokens = jax.lax.dynamic_index_in_dim(fed, position, axis=1, keepdims=True)  # [B, 1]
        inputs = TokenInputs.at(model, layers, s.cache, s.lengths,
                                jnp.broadcast_to(position, s.lengths.shape))
        out = decode_token(inputs, spec, tokens, s.done,
                           exit_threshold(spec.policy, knobs.threshold, s.keys, s.index))
        token, logprob = sample(out.logits, s.keys, s.index, greedy=spec.greedy,
                                temperature=knobs.temperature, top_k=spec.top_k,
                                top_p=knobs.top_p if spec.top_p else None)
        token = jnp.where(s.done, spec.pad_id, token)
        exit_index = jnp.where(s.done, -1, out.exit_index)
        if spec.stream:
            io_callback(_emit, None, knobs.stream_id, s.index, token, exit_index, s.done, ordered=True)
        return s.replace(
            index=s.index + 1,
            tokens=s.tokens.at[:, s.index].set(token),
            logprobs=s.logprobs.at[:, s.index].set(jnp.where(s.done, 0.0, logprob)),
            exit_logprobs=s.exit_logprobs.at[:, s.index].set(jnp.where(s.done, 0.0, out.exit_logprob)),
            exit_index=s.exit_index.at[:, s.index].set(exit_index),
            done=s.done | jnp.isin(token, knobs.stop_tokens),
            cache=s.cache.write(position, out.k, out.v, exit_index),
            loops_run=s.loops_run + out.loops_run, row_loops_run=s.row_loops_run + out.row_loops,
            loop_logits=None if out.loop_logits is None else s.loop_logits.at[s.index].set(out.loop_logits))

    for length in spec.cache_phases:  # token index i writes decoded position i - 1; the last is M - 1
        last = min(length, spec.max_new_tokens - 1)
        state = jax.lax.while_loop(lambda s, last=last: (s.index <= last) & ~jnp.all(s.done),
                                   body, state.replace(cache=state.cache.grow(length)))
    return state


# --- compilation ------------------------------------------------------------------------------------
def lower(fn, graphdef, spec, *args) -> jax.stages.Lowered:
    """`fn` (`prefill` or `decode_loop`) jitted with its static arguments and lowered for `args` (arrays or
    `jax.ShapeDtypeStruct`s, with shardings where wanted). The decode loop donates its state (it
    updates the prefill's cache in place)."""
    donate = (3,) if fn is decode_loop else ()
    with warnings.catch_warnings():  # the first phase's decode slots are donated but outgrown
        warnings.filterwarnings("ignore", "Some donated buffers were not usable")
        return jax.jit(fn, static_argnums=(0, 1), donate_argnums=donate).lower(graphdef, spec, *args)


@functools.lru_cache(maxsize=32)
def _compiled(fn, graphdef, spec: DecodeSpec, treedef, leaves):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Some donated buffers were not usable")
        return lower(fn, graphdef, spec, *jax.tree.unflatten(treedef, leaves)).compile()


def compiled(fn, graphdef, spec, *args) -> tuple[jax.stages.Compiled, bool]:
    """(`fn` compiled for the shapes of `args`, whether this call compiled it): cached by shapes and
    static settings."""
    leaves, treedef = jax.tree.flatten(args)
    misses = _compiled.cache_info().misses
    program = _compiled(fn, graphdef, spec, treedef,
                        tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves))
    return program, _compiled.cache_info().misses > misses


def clear_compiled() -> None:
    """Drop the compiled programs `compiled` keeps (with `jax.clear_caches()`, to release their memory)."""
    _compiled.cache_clear()


def run(fn, graphdef, spec, *args):
    """Compile (cached) and run `fn`; returns (out, run_s, compile_s)."""
    start = time.perf_counter()
    program, fresh = compiled(fn, graphdef, spec, *args)
    compile_s = time.perf_counter() - start if fresh else 0.0
    start = time.perf_counter()
    out = jax.block_until_ready(program(*args))
    return out, time.perf_counter() - start, compile_s
