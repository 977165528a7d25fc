"""Inference benchmarks: `python -m ouro_jax.inference.benchmark [--bench=speed,exit,cache]`.

speed  decode tokens/s at the CPU benchmark shape (`config.cpu_benchmark()`, random weights, float32),
       prompt 64, 128 new tokens, greedy: ouro_jax `generate` vs the same weights in PyTorch through
       Hugging Face `generate` (`to_torch`), side by side in one run. Decode time for both =
       min wall(generate 128 tokens) - min wall(generate 1 token), i.e. everything after the first
       token, over `--repeats` interleaved runs after a warm-up (no compilation is timed).
exit   a trained p-hop model (`--run_dir`, else configs/demo.py is trained into a temporary run):
       the first half of each held-out sequence is the prompt, the second half is fed back token by
       token (teacher forcing through `generate(forced_tokens=...)`, one decode step per token as in
       generation). Each decode step's token is the model's answer at the last position so far;
       answer accuracy = agreement with the p-hop target over the positions whose hop chain exists.
       Decode time per decoded token under Q-exit (sweep of q) and the hidden-state-delta policy vs
       full depth, as the marginal time per token (the policy-independent fixed cost of a decode call
       is subtracted, and also shown included); reports the largest saving by a q whose answer
       accuracy is within 1 point of full depth.
       A last table shows skipping at a realistic per-step cost (cpu_benchmark shape, random weights).
cache  KV cache bytes and decode tokens/s for kv_sharing none / last / average at the speed shape.

Ratios are measured side by side in one process; absolute figures depend on the machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from ouro_jax.data.tasks import PHop, phop_targets
from ouro_jax.inference.decode import generate
from ouro_jax.model import config as configs
from ouro_jax.model.ouro import Ouro

FLAGS = flags.FLAGS
flags.DEFINE_list("bench", ["speed", "exit", "cache"], "Benchmarks to run.")
flags.DEFINE_list("batches", ["1", "8"], "Batch sizes for speed.")
flags.DEFINE_integer("prompt_len", 64, "Prompt length for speed and cache.")
flags.DEFINE_integer("new_tokens", 128, "New tokens for speed and cache.")
flags.DEFINE_integer("repeats", 5, "Timed repetitions (the minimum is reported).")
flags.DEFINE_string("run_dir", "", "Trained p-hop run directory for exit; empty: train configs/demo.py.")
flags.DEFINE_integer("train_steps", 1500, "Steps when exit trains its own model.")
flags.DEFINE_integer("examples", 256, "Held-out p-hop sequences for exit.")
flags.DEFINE_list("exit_batches", ["1", "16"], "Batch sizes for exit.")
flags.DEFINE_list("thresholds", ["0.9", "0.7", "0.5", "0.3", "0.2", "0.1", "0.05", "0.02", "0.01", "0.005"],
                  "Q-exit thresholds q swept by exit.")
flags.DEFINE_list("deltas", ["0.6", "0.7", "0.8", "1.0"], "hidden_delta_eps values swept by exit.")


def _wall(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


# --- speed -------------------------------------------------------------------------------------
def bench_speed() -> str:
    import torch

    from ouro_jax.convert.hf import to_torch

    model = Ouro(configs.cpu_benchmark(), rngs=nnx.Rngs(0))
    torch_model = to_torch(model)
    m, repeats = FLAGS.new_tokens, FLAGS.repeats
    rows = []
    for batch in map(int, FLAGS.batches):
        ids = np.random.default_rng(batch).integers(3, model.config.vocab_size, (batch, FLAGS.prompt_len))
        ids_t = torch.tensor(ids)

        def ours(n, ids=ids):
            return generate(model, ids, n)

        def theirs(n, ids_t=ids_t):
            with torch.inference_mode():
                return torch_model.generate(ids_t, attention_mask=torch.ones_like(ids_t), max_new_tokens=n,
                                            min_new_tokens=n, do_sample=False, pad_token_id=0)

        same = bool((ours(m).tokens == theirs(m)[:, ids.shape[1]:].numpy()).all())  # also warms up
        ours(1), theirs(1)
        walls = {}
        for _ in range(repeats):  # interleaved, so machine noise hits both alike; min is the estimate
            for name, fn in (("ours", ours), ("theirs", theirs)):
                for n in (m, 1):
                    walls.setdefault((name, n), []).append(_wall(lambda fn=fn, n=n: fn(n)))
        ours_s = min(walls["ours", m]) - min(walls["ours", 1])
        theirs_s = min(walls["theirs", m]) - min(walls["theirs", 1])
        inner = max(ours(m).stats.decode_tokens_per_s for _ in range(repeats))
        tokens = batch * (m - 1)
        rows.append([batch, f"{tokens / ours_s:.0f}", f"{inner:.0f}", f"{tokens / theirs_s:.0f}",
                     f"{theirs_s / ours_s:.1f}x", same])
    return (f"### decode speed (cpu_benchmark shape, prompt {FLAGS.prompt_len}, {m} new tokens, greedy, "
            "float32)\n\n" + _table(
                ["batch", "ouro_jax tok/s", "ouro_jax tok/s (decode loop only)", "PyTorch HF generate tok/s",
                 "speed-up", "same tokens"], rows))


# --- exit --------------------------------------------------------------------------------------
def _trained_run() -> str:
    if FLAGS.run_dir:
        return FLAGS.run_dir
    workdir = tempfile.mkdtemp(prefix="ouro_phop_")
    config = Path(__file__).resolve().parents[2] / "configs" / "demo.py"
    print(f"training {config} for {FLAGS.train_steps} steps into {workdir} ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "ouro_jax.train", f"--config={config}:steps={FLAGS.train_steps}",
                    f"--workdir={workdir}"], check=True, stdout=subprocess.DEVNULL)
    return workdir


def _answer_accuracy(x: np.ndarray, predictions: np.ndarray, hops: int) -> tuple[float, float]:
    """(all answered positions, last position) accuracy in %. predictions [B, M] are the answers at
    positions n - M .. n - 1 of the sequences x [B, n]; positions without a full hop chain are skipped."""
    targets, defined = phop_targets(x, hops)
    answered = slice(x.shape[1] - predictions.shape[1], None)
    correct, defined = predictions == targets[:, answered], defined[:, answered]
    return 100 * correct[defined].mean(), 100 * correct[:, -1][defined[:, -1]].mean()


def _exit_table(model, x, prompt_len, settings, batch, hops) -> list[dict]:
    """One row per setting: accuracy, depth, executed loop steps and decode time per decoded token.

    The first `prompt_len` tokens of each sequence are the prompt; the rest are fed back one by one
    (teacher forcing, `forced_tokens`), so every prediction is an in-distribution answer and costs one
    decode step, exactly like a generated token. Per chunk of `batch` sequences the minimum decode time
    over --repeats runs is kept (settings interleaved in random order). A decode call also has a fixed
    cost that does not depend on the policy (launching the executable, ~0.1-0.2 ms on CPU): measured
    as the decode time of a 1-token generation (no decode step), it is subtracted for the marginal time
    per token `us` and kept in `us_total`.
    """
    new_tokens = x.shape[1] - prompt_len + 1  # predictions for positions prompt_len - 1 .. n - 1
    forced = np.pad(x[:, prompt_len:], ((0, 0), (0, 1)))  # the last column is never fed back
    chunks = [slice(i, i + batch) for i in range(0, len(x), batch)]
    times = {name: [np.inf] * len(chunks) for name, _ in settings}
    outs = {name: [None] * len(chunks) for name, _ in settings}
    fixed, order = np.inf, np.random.default_rng(0)
    for c, rows in enumerate(chunks):
        prompts = x[rows, :prompt_len]
        for _ in range(FLAGS.repeats):
            for i in order.permutation(len(settings) + 1):  # a fresh random order: no position bias
                if i == len(settings):
                    fixed = min(fixed, generate(model, prompts, 1).stats.decode_s)
                    continue
                name, kwargs = settings[i]
                outs[name][c] = generate(model, prompts, new_tokens, forced_tokens=forced[rows], **kwargs)
                times[name][c] = min(times[name][c], outs[name][c].stats.decode_s)
    result = []
    for name, _ in settings:
        o = outs[name]
        exit_steps = np.concatenate([r.exit_steps for r in o])
        decoded = int((exit_steps[:, 1:] >= 0).sum())
        acc, last = _answer_accuracy(x, np.concatenate([r.tokens for r in o]), hops)
        result.append(dict(
            name=name, acc=acc, last=last, depth=float(exit_steps[exit_steps >= 0].mean() + 1),
            executed=sum(r.stats.loop_steps for r in o) / sum(r.stats.loop_steps_full for r in o),
            us=1e6 * (sum(times[name]) - fixed * len(chunks)) / decoded,
            us_total=1e6 * sum(times[name]) / decoded))
    for row in result:
        row["saved"] = 100 * (1 - row["us"] / result[0]["us"])
        row["saved_total"] = 100 * (1 - row["us_total"] / result[0]["us_total"])
    return result


def bench_exit() -> str:
    from ouro_jax.convert.pretrained import from_pretrained

    run_dir = _trained_run()
    model = from_pretrained(run_dir)
    config = json.loads((Path(run_dir) / "config.json").read_text())
    n, phop = config["data"]["seq_len"], config["data"]["phop"]
    x = PHop(n=n, p=phop["p"], alphabet=phop["alphabet"], seed=12345, stream=1).batch(
        range(FLAGS.examples))["input_ids"]
    prompt_len = n // 2
    settings = ([("full depth", {})]
                + [(f"Q-exit q={q}", {"exit_threshold": float(q)}) for q in FLAGS.thresholds]
                + [(f"hidden delta eps={e}", {"exit_policy": "hidden_delta", "hidden_delta_eps": float(e)})
                   for e in FLAGS.deltas])
    sections = []
    for batch in map(int, FLAGS.exit_batches):
        rows = _exit_table(model, x, prompt_len, settings, batch, phop["p"])
        full = rows[0]
        ok = [r for r in rows if r["name"].startswith("Q-exit") and r["acc"] >= full["acc"] - 1.0]
        best = max(ok, key=lambda r: r["saved"], default=None)
        verdict = (f"{best['name']}: answer accuracy {best['acc']:.2f} % vs {full['acc']:.2f} % at full "
                   f"depth, decode time per token {-best['saved']:+.0f} % (loop steps executed "
                   f"{best['executed']:.2f} of full depth's)" if best else "none")
        sections.append(
            f"### adaptive exit, batch {batch} ({FLAGS.examples} held-out {phop['p']}-hop sequences of "
            f"length {n}: prompt {prompt_len}, then {n - prompt_len} decode steps answering positions "
            f"{prompt_len - 1}..{n - 1}; run {run_dir})\n\n"
            + _table(["policy", "answer acc %", "last-position acc %", "mean depth (loops)",
                      "loop steps executed / full", "µs / decoded token", "time saved",
                      "µs / decoded token incl. fixed call cost", "time saved incl. fixed"],
                     [[r["name"], f"{r['acc']:.2f}", f"{r['last']:.2f}", f"{r['depth']:.2f}",
                       f"{r['executed']:.2f}", f"{r['us']:.1f}", f"{r['saved']:.0f} %",
                       f"{r['us_total']:.1f}", f"{r['saved_total']:.0f} %"] for r in rows])
            + f"\n\nFastest Q-exit within 1 point of full-depth answer accuracy: {verdict}")
    return "\n\n".join([*sections, _exit_mechanism()])


def _exit_mechanism() -> str:
    """Skipping at a realistic step cost: the cpu_benchmark shape (random weights, gate kernel x10 so
    that tokens exit at various steps), batch 1, prompt 64, 64 new tokens; tokens are not meaningful,
    only time against executed loop steps is."""
    model = Ouro(configs.cpu_benchmark(), rngs=nnx.Rngs(0))
    model.early_exit_gate.kernel[...] = model.early_exit_gate.kernel[...] * 10
    prompts = np.random.default_rng(0).integers(3, model.config.vocab_size, (4, 64))
    settings = [("full depth", {})] + [(f"Q-exit q={q}", {"exit_threshold": q}) for q in (0.9, 0.7, 0.5, 0.3)]
    times = {name: [np.inf] * len(prompts) for name, _ in settings}
    outs = {name: [None] * len(prompts) for name, _ in settings}
    order = np.random.default_rng(0)
    for c, prompt in enumerate(prompts):
        for _ in range(FLAGS.repeats):
            for i in order.permutation(len(settings)):
                name, kwargs = settings[i]
                outs[name][c] = generate(model, prompt[None], 65, **kwargs)
                times[name][c] = min(times[name][c], outs[name][c].stats.decode_s)
    rows = []
    for name, _ in settings:
        stats = [o.stats for o in outs[name]]
        executed = sum(x.loop_steps for x in stats) / sum(x.loop_steps_full for x in stats)
        us = 1e6 * sum(times[name]) / (64 * len(prompts))
        rows.append([name, f"{executed:.2f}", f"{us:.0f}"])
    full_us = float(rows[0][2])
    for row in rows:
        row.append(f"{100 * (1 - float(row[2]) / full_us):.0f} %")
    return ("### adaptive exit mechanism at the cpu_benchmark shape (random weights, batch 1, prompt 64, "
            "64 new tokens; time per decoded token incl. the fixed call cost)\n\n"
            + _table(["policy", "loop steps executed / full", "µs / decoded token", "time saved"], rows))


# --- cache -------------------------------------------------------------------------------------
def bench_cache() -> str:
    model = Ouro(configs.cpu_benchmark(), rngs=nnx.Rngs(0))
    ids = np.random.default_rng(0).integers(3, model.config.vocab_size, (8, FLAGS.prompt_len))
    rows, none = [], None
    for sharing in ("none", "last", "average"):
        outs = [generate(model, ids, FLAGS.new_tokens, kv_sharing=sharing) for _ in range(FLAGS.repeats + 1)]
        nbytes = outs[0].stats.cache_bytes
        none = none or nbytes
        rows.append([sharing, nbytes["prompt"], nbytes["decoded"], nbytes["total"],
                     f"{nbytes['decoded'] / none['decoded']:.4f}",
                     f"{max(o.stats.decode_tokens_per_s for o in outs[1:]):.0f}"])
    return (f"### KV cache (cpu_benchmark shape, T={model.config.total_ut_steps}, batch 8, prompt "
            f"{FLAGS.prompt_len}, {FLAGS.new_tokens} new tokens, float32, greedy)\n\n"
            + _table(["kv_sharing", "prompt bytes", "decoded-token bytes", "total bytes", "decoded / none",
                      "decode tok/s"], rows))


def main(argv):
    del argv
    benches = {"speed": bench_speed, "exit": bench_exit, "cache": bench_cache}
    unknown = set(FLAGS.bench) - set(benches)
    if unknown:
        raise app.UsageError(f"unknown --bench {sorted(unknown)}; choose from {sorted(benches)}")
    print(f"devices: {jax.devices()}\n")
    for name in FLAGS.bench:
        print(benches[name]() + "\n", flush=True)


if __name__ == "__main__":
    app.run(main)
