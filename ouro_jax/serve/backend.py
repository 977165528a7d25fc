"""The request interface the server drives (the engine's, `/work/notes` engine API) and the static-batch
backend on `ouro_jax.generate` that implements it.

  SamplingParams, TokenEvent   one request's settings and one generated token (field for field the
                               continuous-batching engine's, so the server takes either backend)
  StaticBatchBackend           add_request / abort / step / has_work over left-padded `generate` batches

A backend is not thread-safe: one thread calls all four methods (`serve.runner.Runner`).
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
from collections.abc import Sequence

import numpy as np

from ouro_jax.inference.decode import SKIPPED_KV, generate, left_pad
from ouro_jax.inference.engine import SamplingParams, TokenEvent

FINISH_REASONS = ("stop", "length")


def shape_bucket(n: int) -> int:
    """The padded size of a prompt width or a batch's new-token count: 16, 32, then multiples of 64, so a
    static server compiles a bounded number of `generate` programs and runs at most 63 tokens beyond its
    longest request."""
    return 16 if n <= 16 else 32 if n <= 32 else -(-n // 64) * 64


@dataclasses.dataclass
class _Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    tokens: list[int] = dataclasses.field(default_factory=list)
    done: bool = False


class StaticBatchBackend:
    """Static batching on `ouro_jax.generate`: the baseline of continuous batching.

    `step` starts a batch when none runs: the oldest queued request and up to `max_slots - 1` more queued
    requests with the same batch-wide settings (temperature, top_p, top_k, exit_threshold: `generate`
    takes them per call), left-padded into one `generate` call of `max_slots` rows (empty slots hold a
    one-token prompt) whose width and new-token count are `shape_bucket`s. The batch runs in a worker
    thread; every row waits for the longest one and a slot frees only when the whole batch ends (an
    aborted row gets no more events but keeps its slot). Tokens stream through `generate(on_token=...)`
    with NaN log-probabilities; with `logprobs=True` its events come only when the batch ends, each with
    `GenerateOutput.logprobs`. (The continuous-batching engine, `ouro_jax.inference.Engine`, gets both.)
    """

    def __init__(self, model, *, max_slots: int, max_context: int, eos_token_ids: Sequence[int] = (),
                 tokenizer=None, skipped_kv: str = "project", kv_sharing: str = "none",
                 exit_threshold: float | None = None, pad_id: int = 0, logprobs: bool = False):
        if max_slots < 1:
            raise ValueError(f"max_slots={max_slots} must be >= 1")
        if not 2 <= max_context <= model.config.max_position_embeddings:
            raise ValueError(f"max_context={max_context} must lie in [2, max_position_embeddings="
                             f"{model.config.max_position_embeddings}]")
        if skipped_kv not in SKIPPED_KV:
            raise ValueError(f"skipped_kv={skipped_kv!r} must be one of {SKIPPED_KV}")
        _check_threshold(exit_threshold)
        self.model, self.max_slots, self.max_context = model, max_slots, max_context
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.tokenizer, self.skipped_kv, self.kv_sharing = tokenizer, skipped_kv, kv_sharing
        self.exit_threshold, self.pad_id, self.logprobs = exit_threshold, pad_id, logprobs
        self._ids = itertools.count()
        self._queue: list[_Request] = []
        self._running: dict[int, _Request] = {}
        self._events: queue.Queue = queue.Queue()  # lists of TokenEvent, None when a batch ends
        self._worker: threading.Thread | None = None
        self.compile_s = 0.0  # seconds `generate` spent compiling, summed over the batches run

    # --- the interface -----------------------------------------------------------------------------
    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams) -> int:
        """Queue a request; returns its id. ValueError (one line) for bad input; nothing changes then."""
        prompt = [int(t) for t in prompt_ids]
        vocab = self.model.config.vocab_size
        if not prompt:
            raise ValueError("the prompt is empty")
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        if len(prompt) > self.max_context - 1:
            raise ValueError(f"the prompt has {len(prompt)} tokens; the context holds {self.max_context} "
                             "(prompt <= max_context - 1)")
        if params.max_tokens < 1 or len(prompt) + params.max_tokens > self.max_context:
            room = self.max_context - len(prompt)
            raise ValueError(f"max_tokens={params.max_tokens} must lie in [1, {room}]"
                             f" (prompt {len(prompt)} + max_tokens <= max_context {self.max_context})")
        if params.temperature < 0 or not 0 < params.top_p <= 1 or not 0 <= params.top_k <= vocab:
            raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, 0 <= top_k <= {vocab}")
        _check_threshold(params.exit_threshold)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        request = _Request(next(self._ids), prompt, params)
        self._queue.append(request)
        return request.id

    def abort(self, request_id: int) -> None:
        """Drop a queued request, or stop the events of a running one (its slot frees with its batch)."""
        self._queue = [r for r in self._queue if r.id != request_id]
        if request_id in self._running:
            self._running[request_id].done = True

    def has_work(self) -> bool:
        return bool(self._queue) or self._worker is not None

    def step(self) -> list[TokenEvent]:
        """Start a batch if none runs, then wait for the next tokens of the running batch."""
        if self._worker is None:
            if not self._queue:
                return []
            self._start(self._take_batch())
        chunks = [self._events.get()]
        while not self._events.empty():
            chunks.append(self._events.get())
        events = []
        for chunk in chunks:
            if chunk is None:  # the batch ended
                self._worker.join()
                self._worker, self._running = None, {}
            elif isinstance(chunk, BaseException):
                self._worker.join()
                self._worker, self._running = None, {}
                raise chunk
            else:
                events += self._admit(chunk)
        return events

    # --- batches -----------------------------------------------------------------------------------
    def _batch_key(self, params: SamplingParams) -> tuple:
        threshold = self.exit_threshold if params.exit_threshold is None else params.exit_threshold
        greedy = params.temperature == 0
        return (greedy, None if greedy else params.temperature, None if greedy else params.top_p,
                None if greedy else params.top_k, threshold)

    def _take_batch(self) -> list[_Request]:
        key = self._batch_key(self._queue[0].params)
        batch = [r for r in self._queue if self._batch_key(r.params) == key][:self.max_slots]
        taken = {r.id for r in batch}
        self._queue = [r for r in self._queue if r.id not in taken]
        return batch

    def generate_kwargs(self, batch: Sequence[_Request]) -> dict:
        """`generate`'s arguments for a batch (one-token prompts fill the empty slots)."""
        params = batch[0].params
        rows = [r.prompt for r in batch] + [[self.pad_id]] * (self.max_slots - len(batch))
        ids, lengths = left_pad(rows, self.pad_id)
        ids = np.pad(ids, ((0, 0), (shape_bucket(ids.shape[1]) - ids.shape[1], 0)),
                     constant_values=self.pad_id)
        stop = set(self.eos_token_ids)
        for r in batch:
            stop.update(r.params.stop_token_ids)
        seeds = [r.id if r.params.seed is None else r.params.seed for r in batch]
        seeds += [0] * (self.max_slots - len(batch))
        greedy = params.temperature == 0
        return dict(input_ids=ids, prompt_lengths=lengths,
                    max_new_tokens=shape_bucket(max(r.params.max_tokens for r in batch)),
                    exit_threshold=self._batch_key(params)[-1], kv_sharing=self.kv_sharing,
                    skipped_kv=self.skipped_kv, temperature=params.temperature,
                    top_k=None if greedy or params.top_k == 0 else params.top_k,
                    top_p=None if greedy or params.top_p == 1 else params.top_p,
                    seed=np.asarray([s % (1 << 32) for s in seeds], np.uint32), stop_tokens=sorted(stop),
                    pad_id=self.pad_id)

    def _start(self, batch: list[_Request]) -> None:
        self._running = {r.id: r for r in batch}
        kwargs = self.generate_kwargs(batch)
        slots = {r.id: i for i, r in enumerate(batch)}

        def on_token(index, tokens, exit_loops, done):
            del index, done
            self._events.put([(rid, int(tokens[slot]), float("nan"), int(exit_loops[slot]), float("nan"))
                              for rid, slot in slots.items() if exit_loops[slot] > 0])

        def run():
            try:
                out = generate(self.model, **kwargs, on_token=None if self.logprobs else on_token)
                self.compile_s += out.stats.compile_s
                if self.logprobs:
                    self._events.put(_logprob_events(out, slots))
                self._events.put(None)
            except BaseException as err:  # handed to the thread that calls step()
                self._events.put(err)

        self._worker = threading.Thread(target=run, name="static-batch", daemon=True)
        self._worker.start()

    def _admit(self, chunk) -> list[TokenEvent]:
        """Raw (request id, token, logprob, exit loop, exit logprob) tuples -> the events of requests still
        running, with their finish reasons (stop token, stop string, max_tokens)."""
        events = []
        for rid, token, logprob, exit_loop, exit_logprob in chunk:
            request = self._running.get(rid)
            if request is None or request.done:
                continue
            request.tokens.append(token)
            finish = None
            if token in self.eos_token_ids or token in request.params.stop_token_ids:
                finish = "stop"
            elif request.params.stop and self._hits_stop(request):
                finish = "stop"
            elif len(request.tokens) >= request.params.max_tokens:
                finish = "length"
            request.done = finish is not None
            events.append(TokenEvent(rid, token, logprob, exit_loop, exit_logprob, finish))
        return events

    def _hits_stop(self, request: _Request) -> bool:
        text = self.tokenizer.decode(request.tokens, skip_special_tokens=False)
        return any(s and s in text for s in request.params.stop)


def _check_threshold(q: float | None) -> None:
    if q is not None and not 0.0 <= q <= 1.0:
        raise ValueError(f"exit_threshold={q} must lie in [0, 1]")


def _logprob_events(out, slots: dict[int, int]) -> list[tuple]:
    """(request id, token, logprob, exit loop, exit logprob) of every generated token of a finished batch,
    from `GenerateOutput` (float32 log-probabilities)."""
    events = []
    for rid, slot in slots.items():
        n = int(out.lengths[slot])
        events += [(rid, int(t), float(lp), int(e), float(elp)) for t, lp, e, elp in
                   zip(out.tokens[slot, :n], out.logprobs[slot, :n], out.exit_loops[slot, :n],
                       out.exit_logprobs[slot, :n], strict=True)]
    return events
