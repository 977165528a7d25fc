"""Generation benchmarks of `ouro_jax.generate` (KV-cached decoding with adaptive exit).

  decode.speed  decode tokens/s at the CPU benchmark shape (`model.config.cpu_benchmark`, random
                weights, float32), greedy: ouro_jax `generate` vs the same weights in PyTorch through
                Hugging Face `generate` (`convert.hf.to_torch`), side by side in one run. Decode time
                for both = min wall(generate M tokens) - min wall(generate 1 token), i.e. everything
                after the first token, over `repeats` interleaved runs after a warm-up (no compilation
                is timed).
  decode.cache  KV cache bytes and decode tokens/s for kv_sharing none / last / average (batch 8):
                decoded tokens keep 1/T of the cache under sharing.
  decode.exit   a trained p-hop model (`run_dir`, else the demo recipe is trained in-process into a
                temporary run): the first half of each held-out sequence is the prompt, the second half
                is fed back token by token (teacher forcing through `generate(forced_tokens=...)`, one
                decode step per token as in generation). Each decode step's token is the model's answer
                at the last position so far; answer accuracy = agreement with the p-hop target over the
                positions whose hop chain exists. Decode time per decoded token under Q-exit (a sweep of
                q, arXiv:2510.25741 §3.4) with each skipped-loop K/V policy (`generate(skipped_kv=...)`;
                "agree" = % of answers equal to the "compute" policy's at the same q, the released
                code's semantics) and the relative hidden-state-delta rule vs full depth, as the marginal
                time per token (the policy-independent fixed cost of a decode call is subtracted, and
                also shown included); reports the largest saving by a q whose answer accuracy is within
                1 point of full depth. A last table shows skipping at a realistic per-loop cost
                (cpu_benchmark shape, random weights), per skipped-loop K/V policy.
  decode.rows   per-row savings of `generate(compact_rows=...)` at the cpu_benchmark shape (random
                weights, the exit gate's kernel scaled so that tokens exit at various loops; tokens
                are not meaningful): per batch size, gate scale and Q-exit q (skipped_kv "project"),
                the executed fraction of row-loops (`GenerateStats.row_loops_run /
                row_loops_full_depth`, bucket padding included; and the fraction the exit loops need)
                and the decode time relative to full depth, compacted and not. Minimum decode-loop
                time over `repeats` runs, settings interleaved in random order.

Why batch-8 decode trails HF's speed-up at batch 1: at batch 8 a decode step is its small matmuls plus
reading the K/V of all T x N (loop, layer) caches for every row, prompt and decoded positions (the
decode loop's phases read at most twice the filled decoded positions, HF's dynamic cache exactly those);
both are large against this CPU's FLOP rate and memory bandwidth, while at batch 1 HF's per-call Python
overhead dominates (`decode.split`, `decode_split.py`, measures the split; README, Benchmarks).
"""

from __future__ import annotations

import functools
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
from flax import nnx

from ouro_jax.benchmarks.common import Result, model_config, table, wall
from ouro_jax.data.tasks import PHop
from ouro_jax.inference.decode import SKIPPED_KV, generate
from ouro_jax.inference.step import cache_phases
from ouro_jax.model.ouro import Ouro


def benchmark_model(shape: str = "cpu_benchmark") -> Ouro:
    """The benchmarks' model (`common.model_config(shape)`) with random weights, seed 0."""
    return Ouro(model_config(shape), rngs=nnx.Rngs(0))


def _timed(calls: list[Callable[[], Any]], repeats: int, order: np.random.Generator) -> tuple[list, list]:
    """Run each of `calls` (argument-free `generate` calls) `repeats` times, each round in a fresh random
    order drawn from `order` (no position bias) -> (each call's last output, its minimum decode_s)."""
    outs, best = [None] * len(calls), [np.inf] * len(calls)
    for _ in range(repeats):
        for i in order.permutation(len(calls)):
            outs[i] = calls[i]()
            best[i] = min(best[i], outs[i].stats.decode_s)
    return outs, best


# --- speed -------------------------------------------------------------------------------------
def speed(*, repeats: int, batches: list[int], prompt_len: int = 64, new_tokens: int = 128,
          shape: str = "cpu_benchmark") -> Result:
    """Decode tokens/s of ouro_jax vs HF `generate` per batch size (module docstring)."""
    import torch

    from ouro_jax.convert.hf import to_torch

    model = benchmark_model(shape)
    torch_model = to_torch(model)
    m = new_tokens
    rows, figures = [], []
    for batch in batches:
        ids = np.random.default_rng(batch).integers(3, model.config.vocab_size, (batch, prompt_len))
        ids_t = torch.tensor(ids)

        def ours(n, ids=ids):
            return generate(model, ids, n)

        def theirs(n, ids_t=ids_t):
            with torch.inference_mode():
                return torch_model.generate(ids_t, attention_mask=torch.ones_like(ids_t), max_new_tokens=n,
                                            min_new_tokens=n, do_sample=False, pad_token_id=0)

        first = ours(m)  # compiles (prefill and the decode loop's phases)
        same = bool((first.tokens == theirs(m)[:, ids.shape[1]:].numpy()).all())
        ours(1), theirs(1)
        walls = {}
        for _ in range(repeats):  # interleaved, so machine noise hits both alike; min is the estimate
            for name, fn in (("ours", ours), ("theirs", theirs)):
                for n in (m, 1):
                    walls.setdefault((name, n), []).append(wall(lambda fn=fn, n=n: fn(n)))
        ours_s = min(walls["ours", m]) - min(walls["ours", 1])
        theirs_s = min(walls["theirs", m]) - min(walls["theirs", 1])
        inner = max(ours(m).stats.decode_tokens_per_s for _ in range(repeats))
        tokens = batch * (m - 1)
        rows.append([batch, f"{tokens / ours_s:.0f}", f"{inner:.0f}", f"{tokens / theirs_s:.0f}",
                     f"{theirs_s / ours_s:.1f}x", same, f"{first.stats.compile_s:.1f}"])
        figures.append({"batch": batch, "ouro_jax_tokens_per_s": tokens / ours_s,
                        "ouro_jax_decode_loop_tokens_per_s": inner, "hf_tokens_per_s": tokens / theirs_s,
                        "speedup": theirs_s / ours_s, "same_tokens": same,
                        "ouro_jax_compile_s": first.stats.compile_s})
    phases, threads = cache_phases(m), torch.get_num_threads()
    text = (f"decode speed (cpu_benchmark shape, prompt {prompt_len}, {m} new tokens, greedy, float32; "
            f"decode loop phases {phases}; torch threads {threads})\n\n"
            + table(["batch", "ouro_jax tok/s", "ouro_jax tok/s (decode loop only)",
                     "PyTorch HF generate tok/s", "speed-up", "same tokens", "ouro_jax compile s"], rows))
    return Result(text, {"batches": figures, "prompt_len": prompt_len, "new_tokens": m, "repeats": repeats,
                         "cache_phases": list(phases), "torch_threads": threads})


# --- cache -------------------------------------------------------------------------------------
def cache(*, repeats: int, prompt_len: int = 64, new_tokens: int = 128,
          shape: str = "cpu_benchmark") -> Result:
    """KV cache bytes and decode tokens/s per kv_sharing mode, batch 8."""
    model = benchmark_model(shape)
    ids = np.random.default_rng(0).integers(3, model.config.vocab_size, (8, prompt_len))
    rows, figures, none = [], [], None
    for sharing in ("none", "last", "average"):
        outs = [generate(model, ids, new_tokens, kv_sharing=sharing) for _ in range(repeats + 1)]
        nbytes = outs[0].stats.cache_bytes
        none = none or nbytes
        tokens_per_s = max(o.stats.decode_tokens_per_s for o in outs[1:])
        rows.append([sharing, nbytes["prompt"], nbytes["decoded"], nbytes["total"],
                     f"{nbytes['decoded'] / none['decoded']:.4f}", f"{tokens_per_s:.0f}"])
        figures.append({"kv_sharing": sharing, **{f"{k}_bytes": v for k, v in nbytes.items()},
                        "decoded_vs_none": nbytes["decoded"] / none["decoded"],
                        "decode_tokens_per_s": tokens_per_s})
    text = (f"KV cache (cpu_benchmark shape, T={model.config.total_ut_steps}, batch 8, prompt {prompt_len}, "
            f"{new_tokens} new tokens, float32, greedy)\n\n"
            + table(["kv_sharing", "prompt bytes", "decoded-token bytes", "total bytes", "decoded / none",
                     "decode tok/s"], rows))
    return Result(text, {"modes": figures, "prompt_len": prompt_len, "new_tokens": new_tokens})


# --- exit --------------------------------------------------------------------------------------
def _trained_run(run_dir: str | None, train_steps: int) -> str:
    """`run_dir`, or a new temporary run of the p-hop demo recipe trained for `train_steps` steps."""
    if run_dir:
        return run_dir
    from ouro_jax.train import loop, recipes

    workdir = tempfile.mkdtemp(prefix="ouro_phop_")
    print(f"training the demo recipe for {train_steps} steps into {workdir} ...", file=sys.stderr)
    try:
        loop.train(recipes.demo(steps=train_steps), workdir)
    except loop.Interrupted as err:  # the run is saved and resumable; stop the benchmark like Ctrl-C
        print(f"stopped: {err} (pass --run_dir={workdir})", file=sys.stderr)
        raise KeyboardInterrupt from None
    return workdir


def _answer_accuracy(examples: dict[str, np.ndarray], predictions: np.ndarray) -> tuple[float, float]:
    """(all answered positions, last position) accuracy in %. predictions [B, M] are the answers at
    positions n - M .. n - 1 of the p-hop `examples` (`PHop.batch`: targets, loss_mask [B, n]);
    positions without a full hop chain are skipped."""
    targets, defined = examples["targets"], examples["loss_mask"] > 0
    answered = slice(targets.shape[1] - predictions.shape[1], None)
    correct, defined = predictions == targets[:, answered], defined[:, answered]
    return 100 * correct[defined].mean(), 100 * correct[:, -1][defined[:, -1]].mean()


def _exit_table(model, examples, prompt_len, settings, batch, repeats) -> list[dict]:
    """One row per setting: accuracy, depth, loops run and decode time per decoded token.

    The first `prompt_len` tokens of each sequence are the prompt; the rest are fed back one by one
    (teacher forcing, `forced_tokens`), so every prediction is an in-distribution answer and costs one
    decode step, exactly like a generated token. Per chunk of `batch` sequences the minimum decode time
    over `repeats` runs is kept (settings interleaved in random order). A decode call also has a fixed
    cost that does not depend on the policy (launching the executable, ~0.1-0.2 ms on CPU): measured
    as the decode time of a 1-token generation (no decode step), it is subtracted for the marginal time
    per token `us` and kept in `us_total`.
    """
    x = examples["input_ids"]
    new_tokens = x.shape[1] - prompt_len + 1  # predictions for positions prompt_len - 1 .. n - 1
    forced = np.pad(x[:, prompt_len:], ((0, 0), (0, 1)))  # the last column is never fed back
    chunks = [slice(i, i + batch) for i in range(0, len(x), batch)]
    times = {name: [np.inf] * len(chunks) for name, _ in settings}
    outs = {name: [None] * len(chunks) for name, _ in settings}
    fixed, order = np.inf, np.random.default_rng(0)
    for c, rows in enumerate(chunks):
        prompts = x[rows, :prompt_len]
        calls = [functools.partial(generate, model, prompts, new_tokens, forced_tokens=forced[rows], **kwargs)
                 for _, kwargs in settings] + [functools.partial(generate, model, prompts, 1)]
        chunk_outs, chunk_times = _timed(calls, repeats, order)
        fixed = min(fixed, chunk_times[-1])
        for (name, _), out, seconds in zip(settings, chunk_outs[:-1], chunk_times[:-1], strict=True):
            outs[name][c], times[name][c] = out, seconds
    result = []
    for name, _ in settings:
        o = outs[name]
        exit_loops = np.concatenate([r.exit_loops for r in o])  # 1..T, 0 where no token was generated
        decoded = int((exit_loops[:, 1:] > 0).sum())
        acc, last = _answer_accuracy(examples, np.concatenate([r.tokens for r in o]))
        result.append(dict(
            name=name, acc=acc, last=last, depth=float(exit_loops[exit_loops > 0].mean()),
            tokens=np.concatenate([r.tokens for r in o]),
            executed=sum(r.stats.loops_run for r in o) / sum(r.stats.loops_full_depth for r in o),
            us=1e6 * (sum(times[name]) - fixed * len(chunks)) / decoded,
            us_total=1e6 * sum(times[name]) / decoded))
    tokens = {name: row.pop("tokens") for row, (name, _) in zip(result, settings, strict=True)}
    for row, (name, kwargs) in zip(result, settings, strict=True):
        row["saved"] = 100 * (1 - row["us"] / result[0]["us"])
        row["saved_total"] = 100 * (1 - row["us_total"] / result[0]["us_total"])
        exact = next((n for n, k in settings if k == {**kwargs, "skipped_kv": "compute"}), None)
        row["agree"] = exact and 100 * float((tokens[name] == tokens[exact]).mean())
    return result


def exit_policies(*, repeats: int, run_dir: str | None, train_steps: int = 1500, examples: int = 256,
                  batches: list[int], thresholds: list[float], deltas: list[float],
                  mechanism_thresholds: tuple[float, ...] = (0.9, 0.7, 0.5, 0.3),
                  skipped_kv: tuple[str, ...] = SKIPPED_KV, shape: str = "cpu_benchmark") -> Result:
    """Answer accuracy vs decode time of Q-exit (with each `skipped_kv` policy) and hidden-delta exit on
    a trained p-hop model, and the skipping mechanism at the cpu_benchmark shape (module docstring)."""
    from ouro_jax import run
    from ouro_jax.convert.pretrained import from_pretrained

    run_dir = _trained_run(run_dir, train_steps)
    model = from_pretrained(run_dir)
    data = run.read_config(run_dir).data
    n, phop = data.seq_len, data.phop
    task = PHop(n=n, p=phop.p, alphabet=phop.alphabet, p_min=phop.get("p_min", 0), seed=12345, stream=1)
    held_out = task.batch(range(examples))  # the run's task: fixed p, or hop counts p_min..p per example
    hops = f"{task.p_min}..{task.p}-hop" if task.mixed else f"{task.p}-hop"
    prompt_len = n // 2
    settings = ([("full depth", {})]
                + [(f"Q-exit q={q} {kv}", {"exit_threshold": float(q), "skipped_kv": kv})
                   for q in thresholds for kv in skipped_kv]
                + [(f"relative hidden delta eps={e}",
                    {"exit_policy": "hidden_delta_relative", "hidden_delta_eps": float(e)}) for e in deltas])
    sections, figures = [], {"run_dir": str(run_dir), "examples": examples, "prompt_len": prompt_len,
                             "seq_len": n, "hops": hops, "repeats": repeats, "batches": []}
    for batch in batches:
        rows = _exit_table(model, held_out, prompt_len, settings, batch, repeats)
        full = rows[0]
        ok = [r for r in rows if r["name"].startswith("Q-exit") and r["acc"] >= full["acc"] - 1.0]
        best = max(ok, key=lambda r: r["saved"], default=None)
        verdict = (f"{best['name']}: answer accuracy {best['acc']:.2f} % vs {full['acc']:.2f} % at full "
                   f"depth, decode time per token {-best['saved']:+.0f} % (loops run "
                   f"{best['executed']:.2f} of full depth's)" if best else "none")
        sections.append(
            f"adaptive exit, batch {batch} ({examples} held-out {hops} sequences of length {n}: "
            f"prompt {prompt_len}, then {n - prompt_len} decode steps answering positions "
            f"{prompt_len - 1}..{n - 1}; run {run_dir})\n\n"
            + table(["policy", "answer acc %", "agree w/ compute %", "last-position acc %",
                     "mean depth (loops)", "loops run / full depth", "µs / decoded token", "time saved",
                     "µs / decoded token incl. fixed call cost", "time saved incl. fixed"],
                    [[r["name"], f"{r['acc']:.2f}", "-" if r["agree"] is None else f"{r['agree']:.1f}",
                      f"{r['last']:.2f}", f"{r['depth']:.2f}", f"{r['executed']:.2f}", f"{r['us']:.1f}",
                      f"{r['saved']:.0f} %", f"{r['us_total']:.1f}", f"{r['saved_total']:.0f} %"]
                     for r in rows])
            + f"\n\nFastest Q-exit within 1 point of full-depth answer accuracy: {verdict}")
        figures["batches"].append({"batch": batch, "policies": rows, "best_q_exit": best and best["name"]})
    mechanism_text, mechanism = _exit_mechanism(repeats, mechanism_thresholds, skipped_kv, shape)
    figures["mechanism"] = mechanism
    return Result("\n\n".join([*sections, mechanism_text]), figures)


def _exit_mechanism(repeats: int, thresholds: tuple[float, ...], skipped_kv: tuple[str, ...],
                    shape: str) -> tuple[str, list[dict]]:
    """Skipping at a realistic loop cost: the cpu_benchmark shape (random weights, gate kernel x10 so
    that tokens exit at various loops), batch 1, prompt 64, 64 new tokens, per `skipped_kv` policy;
    tokens are not meaningful, only time against loops run and the agreement with "compute" are."""
    model = benchmark_model(shape)
    model.early_exit_gate.kernel[...] = model.early_exit_gate.kernel[...] * 10
    prompts = np.random.default_rng(0).integers(3, model.config.vocab_size, (4, 64))
    settings = [("full depth", {})] + [(f"Q-exit q={q} {kv}", {"exit_threshold": q, "skipped_kv": kv})
                                       for q in thresholds for kv in skipped_kv]
    times = {name: [np.inf] * len(prompts) for name, _ in settings}
    outs = {name: [None] * len(prompts) for name, _ in settings}
    order = np.random.default_rng(0)
    for c, prompt in enumerate(prompts):
        calls = [functools.partial(generate, model, prompt[None], 65, **kwargs) for _, kwargs in settings]
        for (name, _), out, seconds in zip(settings, *_timed(calls, repeats, order), strict=True):
            outs[name][c], times[name][c] = out, seconds
    figures = []
    for name, _ in settings:
        stats = [o.stats for o in outs[name]]
        figures.append({"name": name,
                        "executed": sum(s.loops_run for s in stats) / sum(s.loops_full_depth for s in stats),
                        "us": 1e6 * sum(times[name]) / (64 * len(prompts))})
    tokens = {name: np.concatenate([o.tokens for o in outs[name]]) for name, _ in settings}
    for row, (name, kwargs) in zip(figures, settings, strict=True):
        row["saved"] = 100 * (1 - row["us"] / figures[0]["us"])
        exact = next((n for n, k in settings if k == {**kwargs, "skipped_kv": "compute"}), None)
        row["agree"] = exact and 100 * float((tokens[name] == tokens[exact]).mean())
    text = ("adaptive exit mechanism at the cpu_benchmark shape (random weights, batch 1, prompt 64, 64 new "
            "tokens; time per decoded token incl. the fixed call cost)\n\n"
            + table(["policy", "tokens agree w/ compute %", "loops run / full depth", "µs / decoded token",
                     "time saved"],
                    [[r["name"], "-" if r["agree"] is None else f"{r['agree']:.1f}", f"{r['executed']:.2f}",
                      f"{r['us']:.0f}", f"{r['saved']:.0f} %"] for r in figures]))
    return text, figures



# --- rows --------------------------------------------------------------------------------------
def rows(*, repeats: int, batches: list[int], gate_scales: list[float], thresholds: list[float],
         prompt_len: int = 64, new_tokens: int = 64, shape: str = "cpu_benchmark") -> Result:
    """Decode time vs executed row-loops with and without `compact_rows` (module docstring)."""
    model = benchmark_model(shape)
    gate = model.early_exit_gate.kernel[...]
    t_max = model.config.total_ut_steps
    lines, figures = [], []
    for batch in batches:
        ids = np.random.default_rng(batch).integers(3, model.config.vocab_size, (batch, prompt_len))
        for scale in gate_scales:
            model.early_exit_gate.kernel[...] = gate * scale
            settings = [("full depth", None, False)] + [
                (f"q={q} {'compacted' if c else 'uncompacted'}", q, c)
                for q in thresholds for c in (False, True)]
            calls = [functools.partial(generate, model, ids, new_tokens, exit_threshold=q,
                                       skipped_kv="project", compact_rows=compact)
                     for _, q, compact in settings]
            for call in calls:  # compile and warm up
                call()
            outs, times = _timed(calls, repeats, np.random.default_rng(0))
            for (name, q, compact), out, seconds in zip(settings, outs, times, strict=True):
                decoded = out.exit_loops[:, 1:]
                row = {"batch": batch, "gate_scale": scale, "q": q, "compact_rows": compact,
                       "setting": name, "needed": float(decoded.sum() / (t_max * (decoded > 0).sum())),
                       "executed": out.stats.row_loops_run / out.stats.row_loops_full_depth,
                       "relative_time": seconds / times[0], "ms_per_step": 1e3 * seconds / (new_tokens - 1)}
                row["gap"] = row["relative_time"] - row["executed"]
                figures.append(row)
                lines.append([batch, scale, name, f"{row['needed']:.2f}", f"{row['executed']:.2f}",
                              f"{row['relative_time']:.2f}", f"{row['gap']:+.2f}",
                              f"{row['ms_per_step']:.2f}"])
    model.early_exit_gate.kernel[...] = gate
    text = (f"per-row savings (cpu_benchmark shape, random weights, prompt {prompt_len}, {new_tokens} new "
            f"tokens, greedy, skipped_kv project; time = min decode-loop time of {repeats} runs)\n\n"
            + table(["batch", "gate scale", "setting", "row-loops needed / full", "row-loops executed / full",
                     "time / full depth", "time - executed", "ms / decode step"], lines))
    return Result(text, {"rows": figures, "prompt_len": prompt_len, "new_tokens": new_tokens,
                         "repeats": repeats})
