"""Inference benchmarks: `python -m ouro_jax.inference.benchmark [--bench=speed,exit,cache]`.

speed  decode tokens/s at the CPU benchmark shape (`config.cpu_benchmark()`, random weights, float32),
       prompt 64, 128 new tokens, greedy: ouro_jax `generate` vs the same weights in PyTorch through
       Hugging Face `generate` (`to_torch`), side by side in one run. Decode time for both =
       wall(generate 128 tokens) - wall(generate 1 token), i.e. everything after the first token;
       medians of `--repeats` after a warm-up (so no compilation is timed).
exit   a trained p-hop model (`--run_dir`, else configs/demo.py is trained into a temporary run):
       the first half of each held-out sequence is the prompt and the model generates the second half;
       generated token i is the model's answer at the last position of the sequence it was produced
       from, correct when it equals the p-hop target there (positions whose hop chain exists).
       Decode time per decoded token under Q-exit (sweep of q) and the hidden-state-delta policy vs
       full depth; reports the smallest-compute q whose accuracy is within 1 point of full depth.
cache  KV cache bytes for kv_sharing none / last / average at the speed shape.

Ratios are measured side by side in one process; absolute figures depend on the machine.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from ouro_jax.inference.decode import generate
from ouro_jax.inference.loading import load_run
from ouro_jax.model import config as configs
from ouro_jax.model.ouro import Ouro

FLAGS = flags.FLAGS
flags.DEFINE_list("bench", ["speed", "exit", "cache"], "Benchmarks to run.")
flags.DEFINE_list("batches", ["1", "8"], "Batch sizes for speed.")
flags.DEFINE_integer("prompt_len", 64, "Prompt length for speed and cache.")
flags.DEFINE_integer("new_tokens", 128, "New tokens for speed and cache.")
flags.DEFINE_integer("repeats", 3, "Timed repetitions (median).")
flags.DEFINE_string("run_dir", "", "Trained p-hop run directory for exit; empty: train configs/demo.py.")
flags.DEFINE_integer("train_steps", 1500, "Steps when exit trains its own model.")
flags.DEFINE_integer("examples", 256, "Held-out p-hop sequences for exit.")
flags.DEFINE_list("exit_batches", ["1", "16"], "Batch sizes for exit.")
flags.DEFINE_list("thresholds", ["0.99", "0.95", "0.9", "0.8", "0.7", "0.6", "0.5", "0.4", "0.3", "0.2"],
                  "Q-exit thresholds q swept by exit.")
flags.DEFINE_list("deltas", ["0.02", "0.05", "0.1", "0.2"], "hidden_delta_eps values swept by exit.")


def _median_wall(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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
        ours_s = _median_wall(lambda: ours(m), repeats) - _median_wall(lambda: ours(1), repeats)
        theirs_s = _median_wall(lambda: theirs(m), repeats) - _median_wall(lambda: theirs(1), repeats)
        inner = statistics.median(ours(m).stats.decode_tokens_per_s for _ in range(repeats))
        tokens = batch * (m - 1)
        rows.append([batch, f"{tokens / ours_s:.0f}", f"{inner:.0f}", f"{tokens / theirs_s:.0f}",
                     f"{theirs_s / ours_s:.1f}x", same])
    return ("### decode speed (cpu_benchmark shape, prompt %d, %d new tokens, greedy, float32)\n\n"
            % (FLAGS.prompt_len, m) + _table(
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


def bench_exit() -> str:
    from ouro_jax.data.tasks import PHop, phop_targets

    run_dir = _trained_run()
    model, config = load_run(run_dir)
    phop = config["data"]["phop"]
    n = config["data"]["seq_len"]
    task = PHop(n=n, p=phop["p"], alphabet=phop["alphabet"], seed=12345, stream=1)
    x = task.batch(range(FLAGS.examples))["input_ids"]
    prompt_len = n // 2
    settings = [("full depth", {})] + [(f"Q-exit q={q}", {"exit_threshold": float(q)})
                                       for q in FLAGS.thresholds] + [
        (f"hidden delta eps={e}", {"exit_policy": "hidden_delta", "hidden_delta_eps": float(e)})
        for e in FLAGS.deltas]
    sections = []
    for batch in map(int, FLAGS.exit_batches):
        chunks = [x[i:i + batch, :prompt_len] for i in range(0, len(x), batch)]
        results = {}
        for _ in range(FLAGS.repeats):  # interleave settings so machine noise hits all alike
            for name, kwargs in settings:
                outs = [generate(model, chunk, n - prompt_len, **kwargs) for chunk in chunks]
                decode_s = sum(o.stats.decode_s for o in outs)
                results.setdefault(name, {"times": [], "outs": outs})["times"].append(decode_s)
        rows, full = [], None
        for name, _ in settings:
            outs = results[name]["outs"]
            generated = np.concatenate([o.tokens for o in outs])
            seq = np.concatenate([x[:, :prompt_len], generated], axis=1)
            targets, defined = phop_targets(seq, phop["p"])
            answer = slice(prompt_len - 1, n - 1)  # position i's answer is generated token i - prompt_len + 1
            correct = (generated == targets[:, answer])[defined[:, answer]]
            decoded = sum(int((o.exit_steps[:, 1:] >= 0).sum()) for o in outs)
            per_token = statistics.median(results[name]["times"]) / decoded
            depth = float(np.mean(np.concatenate([o.exit_steps[o.exit_steps >= 0] for o in outs]) + 1))
            executed = sum(o.stats.loop_steps for o in outs) / sum(o.stats.loop_steps_full for o in outs)
            row = dict(name=name, acc=100 * correct.mean(), us=1e6 * per_token, depth=depth, executed=executed)
            full = full or row
            row["saved"] = 100 * (1 - row["us"] / full["us"])
            rows.append(row)
        ok = [r for r in rows[1:] if r["name"].startswith("Q-exit") and r["acc"] >= full["acc"] - 1.0]
        best = max(ok, key=lambda r: r["saved"], default=None)
        sections.append(
            f"### adaptive exit, batch {batch} ({FLAGS.examples} held-out {phop['p']}-hop sequences, "
            f"prompt {prompt_len}, {n - prompt_len} generated tokens each; run {run_dir})\n\n" + _table(
                ["policy", "answer acc %", "mean depth (loops)", "loop steps executed / full",
                 "decode µs / token", "time saved vs full"],
                [[r["name"], f"{r['acc']:.2f}", f"{r['depth']:.2f}", f"{r['executed']:.2f}", f"{r['us']:.0f}",
                  f"{r['saved']:.0f} %"] for r in rows])
            + ("\n\nBest Q-exit within 1 point of full depth: "
               + (f"{best['name']}: accuracy {best['acc']:.2f} % vs {full['acc']:.2f} %, "
                  f"{best['saved']:.0f} % less decode time per token" if best else "none")))
    return "\n\n".join(sections)


# --- cache -------------------------------------------------------------------------------------
def bench_cache() -> str:
    model = Ouro(configs.cpu_benchmark(), rngs=nnx.Rngs(0))
    ids = np.random.default_rng(0).integers(3, model.config.vocab_size, (8, FLAGS.prompt_len))
    rows, none = [], None
    for sharing in ("none", "last", "average"):
        nbytes = generate(model, ids, FLAGS.new_tokens, kv_sharing=sharing).stats.cache_bytes
        none = none or nbytes
        rows.append([sharing, nbytes["prompt"], nbytes["decoded"], nbytes["total"],
                     f"{nbytes['decoded'] / none['decoded']:.4f}"])
    return (f"### KV cache bytes (cpu_benchmark shape, T={model.config.total_ut_steps}, batch 8, prompt "
            f"{FLAGS.prompt_len}, {FLAGS.new_tokens} new tokens, float32)\n\n"
            + _table(["kv_sharing", "prompt bytes", "decoded-token bytes", "total bytes",
                      "decoded / none"], rows))


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
