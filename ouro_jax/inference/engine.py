"""Continuous batching: a fixed number of slots decoding together, requests joining and leaving mid-flight.

The engine keeps S = max_slots rows on the device with static shapes (compiled once per configuration):
  prompt K/V   one [S, K, C, H] array per (loop, layer): a slot's prompt, left-padded within C = max_context
               positions (as `generate` left-pads a batch), every loop's K/V (`cache.py`);
  decoded K/V  one [S, K, C, H] array per (loop, layer), or per layer with kv_sharing "last" / "average"
               (1/T of it); a slot's decoded tokens from position 0.
So a slot holds up to C prompt and C decoded positions; a request ends at C tokens in all ("length").

`add_request` queues a request; `step` admits queued requests into free slots (the prompt through all
loops at batch 1, padded to a power-of-two length, then inserted into the slot; its first token comes from
the last prompt position at its exit loop) and then decodes one token for every running slot with the
token step `generate` runs (`step.decode_token`: per-row adaptive depth, skipped-K/V fill, row
compaction), each row at its own position. A row leaves at a stop token, a stop string or max_tokens and
its slot is free for the next step.

Per-request sampling (`sampling.sample_rows`): temperature, top_k, top_p and the PRNG key are per row, and
row b's i-th token is drawn with fold_in(key(seed), i) exactly as `generate(seed=seed)` draws it, so a
request's tokens never depend on its neighbours. Every token comes with its float32 log-probability under
the distribution it was drawn from (after top-k / top-p truncation; greedy: log_softmax of the exit
loop's logits) and its exit loop 1..T.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections import deque
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from ouro_jax.inference import step as step_lib
from ouro_jax.inference.cache import SHARING, KVCache
from ouro_jax.inference.decode import (
    DEFAULT_COMPACT_ROWS,
    DEFAULT_SKIPPED_KV,
    effective_skipped_kv,
    exit_settings,
)
from ouro_jax.inference.sampling import row_keys, sample_rows
from ouro_jax.inference.step import SKIPPED_KV, DecodeSpec, TokenInputs
from ouro_jax.model.exits import select_loop


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's settings: temperature 0 is greedy; top_k 0 and top_p 1 are off; seed None uses the
    request id; stop_token_ids add to the engine's eos ids; stop strings are matched on the decoded text
    (needs the engine's tokenizer); exit_threshold None uses the engine's default."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    exit_threshold: float | None = None


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """A generated token: its float32 log-probability (`SamplingParams` docstring), its exit loop (1..T),
    that loop's float32 log-probability under the gate's exit distribution (`GenerateOutput.exit_logprobs`)
    and finish_reason (None while running, "stop" at a stop token or string, "length" at max_tokens or
    the context's end)."""

    request_id: int
    token: int
    logprob: float
    exit_loop: int
    exit_logprob: float
    finish_reason: str | None


@struct.dataclass
class SlotState:
    """The slots on the device: cache (prompt [S, K, C, H] per (loop, layer), decoded as the module
    docstring says); lengths [S] prompt tokens; decoded [S] tokens fed back so far (the next one's cache
    position); token [S] the last generated token (fed next); keys [S]; temperature, top_p [S] float32;
    top_k [S] int32; threshold [S] float32 (q or eps); active [S] bool."""

    cache: KVCache
    lengths: jax.Array
    decoded: jax.Array
    token: jax.Array
    keys: jax.Array
    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array
    threshold: jax.Array
    active: jax.Array


def _insert(graphdef, spec: DecodeSpec, params, state: SlotState, slot, ids, length, key, temperature,
            top_p, top_k, threshold):
    """Prefill one prompt ids [1, L] (left-padded, `length` real tokens) into `slot`; its first token.
    Returns (state, token, logprob, exit loop index, exit logprob)."""
    model = nnx.merge(graphdef, params)
    ks, vs, last, gates = step_lib.prompt_loops(model, ids, length[None], spec.policy.num_loops)
    exit_index, exit_logprob = step_lib.first_token_exit(
        spec.policy, last, gates, step_lib.exit_threshold(spec.policy, threshold[None], key[None], 0))
    logits = model.logits(select_loop(last, exit_index)[:, None])[:, 0]
    token, logprob = sample_rows(logits, key[None], jnp.zeros((1,), jnp.int32), temperature[None],
                                 top_k[None], top_p[None])
    cache = state.cache
    c, p = cache.prompt_k[0].shape[2], ids.shape[1]
    put = lambda slots, new: tuple(jax.lax.dynamic_update_slice(x, y, (slot, 0, c - p, 0))
                                   for x, y in zip(slots, new, strict=True))
    flat = lambda nested: [x for per_loop in nested for x in per_loop]
    cache = cache.replace(prompt_k=put(cache.prompt_k, flat(ks)), prompt_v=put(cache.prompt_v, flat(vs)))
    row = lambda x, value: x.at[slot].set(value)
    state = state.replace(
        cache=cache, lengths=row(state.lengths, length), decoded=row(state.decoded, 0),
        token=row(state.token, token[0]), keys=row(state.keys, key),
        temperature=row(state.temperature, temperature), top_p=row(state.top_p, top_p),
        top_k=row(state.top_k, top_k), threshold=row(state.threshold, threshold),
        active=row(state.active, True))
    return state, token[0], logprob[0], exit_index[0], exit_logprob[0]


def _decode_step(graphdef, spec: DecodeSpec, params, state: SlotState):
    """One token for every active slot, each at its own position.
    Returns (state, tokens [S], logprobs [S], exit loop indices [S] (-1 for inactive slots), exit
    logprobs [S])."""
    model = nnx.merge(graphdef, params)
    inputs = TokenInputs.at(model, step_lib.fused_layers(model), state.cache, state.lengths, state.decoded)
    threshold = step_lib.exit_threshold(spec.policy, state.threshold, state.keys, state.decoded + 1)
    out = step_lib.decode_token(inputs, spec, state.token[:, None], ~state.active, threshold)
    token, logprob = sample_rows(out.logits, state.keys, state.decoded + 1, state.temperature, state.top_k,
                                 state.top_p)
    exit_index = jnp.where(state.active, out.exit_index, -1)
    cache = state.cache.write(jnp.where(state.active, state.decoded, state.cache.decoded_length), out.k,
                              out.v, exit_index)
    state = state.replace(cache=cache, token=jnp.where(state.active, token, state.token),
                          decoded=state.decoded + state.active)
    return state, token, logprob, exit_index, out.exit_logprob


@functools.partial(jax.jit, donate_argnums=(0,))
def _release(state: SlotState, slot) -> SlotState:
    return state.replace(active=state.active.at[slot].set(False))


# Compiled once per (model structure, spec, shapes), shared by every engine of that configuration.
_insert_jit = jax.jit(_insert, static_argnums=(0, 1), donate_argnums=(3,))
_decode_jit = jax.jit(_decode_step, static_argnums=(0, 1), donate_argnums=(3,))


@dataclasses.dataclass
class _Request:
    request_id: int
    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset
    generated: list[int] = dataclasses.field(default_factory=list)


class Engine:
    """Continuous-batching decoding engine (module docstring). Not thread-safe: drive it from one thread.

    Args:
      model: an `ouro_jax.Ouro`.
      max_slots: S rows decoding together.
      max_context: C, the most prompt tokens (C - 1) and prompt + generated tokens (C) of a request.
      eos_token_ids: stop tokens of every request.
      tokenizer: with `decode(ids) -> str`, for stop strings.
      skipped_kv, kv_sharing, compact_rows: as in `generate`.
      exit_threshold: the default Q-exit q (None: full depth; a request may set its own q).
      exit_at_loop: a fixed depth k for every request (no per-request threshold then).
      exit_policy, hidden_delta_eps: as in `generate` (eps the default of the hidden-state rules).
    """

    def __init__(self, model, *, max_slots: int, max_context: int, eos_token_ids: Sequence[int] = (),
                 tokenizer=None, skipped_kv: str = DEFAULT_SKIPPED_KV, kv_sharing: str = "none",
                 exit_threshold: float | None = None, exit_at_loop: int | None = None,
                 exit_policy: str = "gate", hidden_delta_eps: float = 0.05,
                 compact_rows: bool = DEFAULT_COMPACT_ROWS):
        cfg = model.config
        if max_slots < 1 or max_context < 2:
            raise ValueError(f"need max_slots >= 1 and max_context >= 2, got {max_slots}, {max_context}")
        if kv_sharing not in SHARING:
            raise ValueError(f"kv_sharing={kv_sharing!r} must be one of {SHARING}")
        if skipped_kv not in SKIPPED_KV:
            raise ValueError(f"skipped_kv={skipped_kv!r} must be one of {SKIPPED_KV}")
        policy, threshold = exit_settings(cfg.total_ut_steps, exit_threshold, exit_at_loop, exit_policy,
                                          hidden_delta_eps)
        if policy.kind == "fixed" and exit_at_loop is None:  # full depth by default, a request may set q
            policy, threshold = dataclasses.replace(policy, kind="gate"), 1.0
        skipped_kv = effective_skipped_kv(policy, skipped_kv, kv_sharing)
        self.model, self.tokenizer = model, tokenizer
        self.max_slots, self.max_context = max_slots, max_context
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.default_threshold = float(threshold)
        self.spec = DecodeSpec(policy=policy, kv_sharing=kv_sharing, skipped_kv=skipped_kv,
                               max_new_tokens=max_context, greedy=False, top_k=None, top_p=True, pad_id=0,
                               keep_loop_logits=False, stream=False,
                               compact_rows=compact_rows and skipped_kv != "compute",
                               cache_phases=(max_context,))
        self._graphdef, self._params = nnx.split(model)
        self._state = self._empty_state()
        self._slots: list[_Request | None] = [None] * max_slots
        self._queue: deque[_Request] = deque()
        self._ids = itertools.count()

    def _empty_state(self) -> SlotState:
        cfg, s, c = self.model.config, self.max_slots, self.max_context
        num_loops, n = self.spec.policy.num_loops, cfg.num_hidden_layers
        zeros = lambda: [[jnp.zeros((s, cfg.num_key_value_heads, c, cfg.head_dim), cfg.compute_jnp_dtype)
                          for _ in range(n)] for _ in range(num_loops)]
        cache = KVCache.create(zeros(), zeros(), c, self.spec.kv_sharing)
        f32, i32 = lambda: jnp.zeros((s,), jnp.float32), lambda: jnp.zeros((s,), jnp.int32)
        return SlotState(cache=cache, lengths=i32(), decoded=i32(), token=i32(),
                         keys=row_keys(jnp.zeros((s,), jnp.uint32)), temperature=f32(), top_p=f32() + 1,
                         top_k=i32(), threshold=f32(), active=jnp.zeros((s,), jnp.bool_))

    # --- requests -------------------------------------------------------------------------------------
    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams) -> int:
        """Queue a request; returns its id. ValueError (one line) for bad input; nothing changes then."""
        prompt = [int(t) for t in prompt_ids]
        vocab = self.model.config.vocab_size
        if not 1 <= len(prompt) <= self.max_context - 1:
            raise ValueError(f"prompt of {len(prompt)} tokens: need 1 to max_context - 1 = "
                             f"{self.max_context - 1}")
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        if params.max_tokens < 1:
            raise ValueError(f"max_tokens={params.max_tokens} must be >= 1")
        if params.temperature < 0 or not 0 < params.top_p <= 1 or not 0 <= params.top_k <= vocab:
            raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, 0 <= top_k <= {vocab}; got "
                             f"{params.temperature}, {params.top_p}, {params.top_k}")
        if params.exit_threshold is not None:
            if self.spec.policy.kind in ("fixed", "sample"):
                raise ValueError(f"exit_threshold: this engine's exits are {self.spec.policy.kind!r}")
            if self.spec.policy.kind == "gate" and not 0 <= params.exit_threshold <= 1:
                raise ValueError(f"exit_threshold={params.exit_threshold} must lie in [0, 1]")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need an engine with a tokenizer")
        request = _Request(next(self._ids), prompt, params,
                           self.eos_token_ids | frozenset(int(t) for t in params.stop_token_ids))
        self._queue.append(request)
        return request.request_id

    def abort(self, request_id: int) -> None:
        """Drop a queued or running request; its slot is free at once (no more events for it)."""
        self._queue = deque(r for r in self._queue if r.request_id != request_id)
        for slot, r in enumerate(self._slots):
            if r is not None and r.request_id == request_id:
                self._free(slot)

    def has_work(self) -> bool:
        return bool(self._queue) or any(r is not None for r in self._slots)

    def _free(self, slot: int) -> None:
        self._slots[slot] = None
        self._state = _release(self._state, slot)

    # --- one iteration --------------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        """Admit queued requests into free slots (their first tokens), then decode one token for every
        running slot. Returns the new tokens; a finished request's slot is free for the next step."""
        events = []
        for slot in range(self.max_slots):
            if self._slots[slot] is None and self._queue:
                events.append(self._admit(slot, self._queue.popleft()))
        running = [s for s, r in enumerate(self._slots) if r is not None]
        if not running:
            return events
        self._state, *outputs = _decode_jit(self._graphdef, self.spec, self._params, self._state)
        tokens, logprobs, exit_index, exit_logprobs = (np.asarray(x) for x in outputs)
        for slot in running:
            events.append(self._emit(slot, int(tokens[slot]), logprobs[slot], int(exit_index[slot]),
                                     exit_logprobs[slot]))
        return events

    def _admit(self, slot: int, request: _Request) -> TokenEvent:
        p, length = request.params, len(request.prompt)
        padded = 1 << (length - 1).bit_length()  # a power of two: few prefill compilations
        ids = np.zeros((1, min(padded, self.max_context - 1)), np.int32)
        ids[0, ids.shape[1] - length:] = request.prompt
        seed = request.request_id if p.seed is None else p.seed
        threshold = self.default_threshold if p.exit_threshold is None else p.exit_threshold
        self._slots[slot] = request
        self._state, token, logprob, exit_index, exit_logprob = _insert_jit(
            self._graphdef, self.spec, self._params, self._state, jnp.int32(slot), jnp.asarray(ids),
            jnp.int32(length), jax.random.key(np.uint32(seed)), jnp.float32(p.temperature),
            jnp.float32(p.top_p), jnp.int32(p.top_k), jnp.float32(threshold))
        return self._emit(slot, int(token), logprob, int(exit_index), exit_logprob)

    def _emit(self, slot: int, token: int, logprob, exit_index: int, exit_logprob) -> TokenEvent:
        """Record a slot's new token; free the slot when its request finished."""
        request = self._slots[slot]
        request.generated.append(token)
        reason = None
        if token in request.stop_ids or (request.params.stop and self._stop_string(request)):
            reason = "stop"
        elif (len(request.generated) >= request.params.max_tokens
              or len(request.prompt) + len(request.generated) >= self.max_context):
            reason = "length"
        if reason is not None:
            self._free(slot)
        return TokenEvent(request.request_id, token, np.float32(logprob).item(), exit_index + 1,
                          np.float32(exit_logprob).item(), reason)

    def _stop_string(self, request: _Request) -> bool:
        text = self.tokenizer.decode(request.generated)
        return any(s in text for s in request.params.stop)
