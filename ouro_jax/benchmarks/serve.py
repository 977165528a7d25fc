"""Serving benchmark: a load generator driving the serving backends (`ouro_jax.serve`).

  serve  Poisson arrivals (rate r requests/s) of requests whose prompt and output lengths are drawn
         log-uniformly from wide ranges (default outputs 8-512 tokens; no stop tokens, so every request
         produces exactly its length), replayed against each backend with `max_slots` slots at the same
         arrival times: the server's backends (`ouro_jax.serve.server.BACKENDS`: static-batch `generate`
         now, the continuous-batching engine once it is registered there) and Hugging Face `generate` on
         the same weights in PyTorch (`convert.hf.to_torch`), in static batches of up to `max_slots`
         queued requests, each batch run to its longest request (no streaming: its tokens arrive when the
         batch ends). Model: the cpu_benchmark shape (random weights, the exit gate's kernel scaled by
         `gate_scale` so that tokens exit at various loops), greedy, float32, at full depth and under
         Q-exit (`thresholds`). Reported per backend, exit setting and rate: throughput (generated tokens
         / time from the first arrival to the last token), time to first token (TTFT, from arrival) and
         time per output token (TPOT, (last - first token time) / (tokens - 1)), p50 and p99, mean loops
         per token, and the compilation seconds that fell inside the timed run (a backend that compiles,
         one with a `compile_s` counter, runs each workload once untimed first, which compiles the shapes
         that its batches need; the timed run may still meet a new shape).

The backends are driven in-process through their add_request / step interface (what the server's runner
thread does), so HTTP costs are not in the figures.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Sequence

import numpy as np
from flax import nnx

from ouro_jax.benchmarks.common import Result, table
from ouro_jax.inference.engine import SamplingParams, TokenEvent
from ouro_jax.model import config as configs
from ouro_jax.model.ouro import Ouro


@dataclasses.dataclass(frozen=True)
class Arrival:
    time: float  # seconds after the start
    prompt: tuple[int, ...]
    max_tokens: int


def log_uniform(rng: np.random.Generator, low: int, high: int, size: int) -> np.ndarray:
    """Integers in [low, high] whose logarithm is uniform (as many short as long ones per octave)."""
    return np.clip(np.round(np.exp(rng.uniform(np.log(low), np.log(high + 1), size))), low, high).astype(int)


def workload(num_requests: int, rate: float, prompt_lens: tuple[int, int], output_lens: tuple[int, int],
             vocab_size: int, seed: int = 0) -> list[Arrival]:
    """Poisson arrivals at `rate` requests/s (the first at 0) with log-uniform prompt / output lengths."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, num_requests)
    times = np.cumsum(gaps) - gaps[0]
    prompts = log_uniform(rng, *prompt_lens, num_requests)
    outputs = log_uniform(rng, *output_lens, num_requests)
    return [Arrival(float(t), tuple(int(x) for x in rng.integers(3, vocab_size, p)), int(m))
            for t, p, m in zip(times, prompts, outputs, strict=True)]


@dataclasses.dataclass
class _Record:
    arrival: float
    first: float | None = None
    last: float | None = None
    tokens: int = 0
    loops: int = 0


def drive(backend, arrivals: Sequence[Arrival]) -> tuple[list[_Record], float]:
    """Replay `arrivals` against `backend` in real time -> (one record per request, seconds from the first
    arrival to the last token). Ends when every request has produced its tokens (each has a finite
    max_tokens)."""
    pending = collections.deque(arrivals)
    records: dict[int, _Record] = {}
    start = time.perf_counter()
    while pending or backend.has_work():
        now = time.perf_counter() - start
        while pending and pending[0].time <= now:
            a = pending.popleft()
            records[backend.add_request(a.prompt, SamplingParams(max_tokens=a.max_tokens))] = _Record(a.time)
        if backend.has_work():
            events: list[TokenEvent] = backend.step()
            at = time.perf_counter() - start
            for e in events:
                r = records[e.request_id]
                r.first = at if r.first is None else r.first
                r.last, r.tokens, r.loops = at, r.tokens + 1, r.loops + e.exit_loop
        elif pending:
            time.sleep(max(0.0, pending[0].time - (time.perf_counter() - start)))
    done = list(records.values())
    return done, max(r.last for r in done)


def summary(records: Sequence[_Record], elapsed: float) -> dict:
    """Throughput, TTFT and TPOT percentiles (seconds), mean loops per token."""
    ttft = np.asarray([r.first - r.arrival for r in records])
    tpot = np.asarray([(r.last - r.first) / (r.tokens - 1) for r in records if r.tokens > 1])
    tokens = sum(r.tokens for r in records)
    pct = lambda x, q: float(np.percentile(x, q)) if len(x) else float("nan")
    return {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed,
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99), "tpot_p50_s": pct(tpot, 50),
            "tpot_p99_s": pct(tpot, 99), "mean_loops": sum(r.loops for r in records) / tokens}


class HFStaticBatches:
    """Hugging Face `generate` (PyTorch, greedy) in static batches with the backend interface: `step` runs
    up to `max_slots` queued requests as one left-padded batch to its longest request and returns all their
    tokens at once (exit loop: T, every loop runs)."""

    def __init__(self, model: Ouro, *, max_slots: int, exit_threshold: float | None = None):
        from ouro_jax.convert.hf import to_torch

        self.torch_model, self.max_slots, self.exit_threshold = to_torch(model), max_slots, exit_threshold
        self.num_loops = model.config.total_ut_steps
        self._queue: list[tuple[int, tuple[int, ...], int]] = []
        self._next = 0

    def add_request(self, prompt_ids, params: SamplingParams) -> int:
        self._next += 1
        self._queue.append((self._next, tuple(prompt_ids), params.max_tokens))
        return self._next

    def has_work(self) -> bool:
        return bool(self._queue)

    def step(self) -> list[TokenEvent]:
        import torch

        from ouro_jax.inference import left_pad

        batch, self._queue = self._queue[:self.max_slots], self._queue[self.max_slots:]
        ids, lengths = left_pad([p for _, p, _ in batch])
        mask = np.arange(ids.shape[1])[None] >= (ids.shape[1] - lengths)[:, None]
        m = max(n for _, _, n in batch)
        with torch.inference_mode():
            out = self.torch_model.generate(torch.tensor(ids, dtype=torch.long),
                                            attention_mask=torch.tensor(mask, dtype=torch.long),
                                            max_new_tokens=m, min_new_tokens=m, do_sample=False,
                                            pad_token_id=0, exit_threshold=self.exit_threshold)
        new = out[:, ids.shape[1]:].numpy()
        return [TokenEvent(rid, int(new[row, i]), float("nan"), self.num_loops, float("nan"),
                           "length" if i == n - 1 else None)
                for row, (rid, _, n) in enumerate(batch) for i in range(n)]


def serve(*, backends: list[str], rates: list[float], thresholds: list[float | None], num_requests: int,
          prompt_lens: tuple[int, int], output_lens: tuple[int, int], max_slots: int, gate_scale: float,
          preset: str = "cpu_benchmark", seed: int = 0) -> Result:
    """The serve benchmark (module docstring) -> a table per exit setting and the figures."""
    from ouro_jax.serve.server import BACKENDS

    config = configs.PRESETS[preset]()
    model = Ouro(config, rngs=nnx.Rngs(seed))
    model.early_exit_gate.kernel[...] = model.early_exit_gate.kernel[...] * gate_scale
    context = prompt_lens[1] + output_lens[1] + 64  # room for the static backend's shape buckets
    if context > config.max_position_embeddings:
        raise ValueError(f"prompt {prompt_lens[1]} + output {output_lens[1]} tokens exceed the {preset} "
                         f"model's context {config.max_position_embeddings}")

    def make(name: str, q: float | None):
        if name == "hf":
            return HFStaticBatches(model, max_slots=max_slots, exit_threshold=q)
        return BACKENDS[name](model, max_slots=max_slots, max_context=context, exit_threshold=q)

    rows, figures = [], []
    for q in thresholds:
        for name in backends:
            backend = make(name, q)
            for rate in rates:
                arrivals = workload(num_requests, rate, prompt_lens, output_lens, config.vocab_size, seed)
                if hasattr(backend, "compile_s"):  # untimed: compiles what these batches need
                    drive(backend, arrivals)
                compiled = getattr(backend, "compile_s", 0.0)
                records, elapsed = drive(backend, arrivals)
                in_run = getattr(backend, "compile_s", 0.0) - compiled
                s = summary(records, elapsed) | {"backend": name, "exit_threshold": q, "rate": rate,
                                                 "compile_s_in_run": in_run}
                figures.append(s)
                rows.append([name, "full" if q is None else f"q={q}", rate, f"{s['tokens_per_s']:.0f}",
                             f"{s['ttft_p50_s']:.2f}", f"{s['ttft_p99_s']:.2f}",
                             f"{1e3 * s['tpot_p50_s']:.1f}", f"{1e3 * s['tpot_p99_s']:.1f}",
                             f"{s['mean_loops']:.2f}", f"{s['compile_s_in_run']:.1f}"])
    base = {(f["exit_threshold"], f["rate"]): f["tokens_per_s"] for f in figures if f["backend"] == "static"}
    for f, row in zip(figures, rows, strict=True):
        ref = base.get((f["exit_threshold"], f["rate"]))
        f["throughput_vs_static"] = f["tokens_per_s"] / ref if ref else None
        row.insert(4, "" if ref is None else f"{f['throughput_vs_static']:.2f}x")
    text = (f"serve ({preset} shape, random weights, gate x{gate_scale}, greedy, float32; {num_requests} "
            f"requests, prompts {prompt_lens[0]}-{prompt_lens[1]} and outputs "
            f"{output_lens[0]}-{output_lens[1]} tokens log-uniform, Poisson arrivals; {max_slots} slots)\n\n"
            + table(["backend", "exit", "rate req/s", "tok/s", "vs static", "TTFT p50 s", "TTFT p99 s",
                     "TPOT p50 ms", "TPOT p99 ms", "loops/token", "compile s in run"], rows))
    return Result(text, {"runs": figures, "num_requests": num_requests, "prompt_lens": list(prompt_lens),
                         "output_lens": list(output_lens), "max_slots": max_slots, "gate_scale": gate_scale,
                         "preset": preset})
