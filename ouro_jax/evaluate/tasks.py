"""Standard benchmarks per loop from one pass (arXiv:2510.25741 §5.4: Tables 10-11, Fig. 5).

    python -m ouro_jax.evaluate --model=PATH --tasks=arc_easy,hellaswag --loops=1-8 --output_dir=DIR

runs lm-evaluation-harness tasks (registered ones, or local YAMLs with --include_path) through the native
lm-eval model and gives every task's metric at every loop count and under every Q-exit threshold (with
the mean loops it ran): `sweep` returns, and `write` saves as DIR/tasks.json,

    {task: {"metric": "acc,none", "loops": {"1": value, ...},
            "q_exit": {"0.5": {"value": ..., "mean_loops": ...}, ...}, "seconds": ...}}

next to DIR/tasks.md (a markdown table) and the plots DIR/metric_vs_loops.png and
DIR/metric_vs_mean_loops.png.

One pass: `LoopSweepLM` answers scoring requests (`loglikelihood`, `multiple_choice`,
`loglikelihood_rolling`) from one forward per batch that runs the largest loop count L once and keeps,
per request row, its score at every loop 1..L and under every threshold (the per-loop logits exist
anyway: the exit gate reads every loop). lm-eval then evaluates the task once per depth with the model
answering from that table, so each value is lm-eval's own aggregation of the same per-request scores.
`generate_until` runs one generation per depth.

Depths, as the native model (`ouro_jax.evaluate.lm_eval.model`) would be asked for them:
  loop k      model args `exit_at_loop=k`, with `num_loops=k` past the trained T;
  Q-exit q    `exit_threshold=q` over min(T, L) loops (the trained depth, or fewer when the sweep stops
              earlier), every token at the first loop whose exit CDF reaches q.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ouro_jax.evaluate.lm_eval.model import OuroLM, Row, row_scores, token_scores, with_num_loops
from ouro_jax.model import exits

MAX_LOOPS = 32
Selection = tuple[str, float]  # ("loop", k) or ("q_exit", q)


def parse_loops(text: str) -> list[int]:
    """'1-8' / '1,2,4' / '1-4,8' -> sorted distinct loop counts, each in 1..MAX_LOOPS (ValueError)."""
    loops = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise ValueError(f"--loops: expected counts or ranges like 1-8 or 1,2,4, got {text!r}")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if not 1 <= first <= last <= MAX_LOOPS:
            raise ValueError(f"--loops: loop counts must lie in 1..{MAX_LOOPS}, got {part}")
        loops.update(range(first, last + 1))
    if not loops:
        raise ValueError("--loops: no loop count given")
    return sorted(loops)


def check_thresholds(thresholds: Sequence[float]) -> tuple[float, ...]:
    """Q-exit thresholds as floats, each in [0, 1] (ValueError)."""
    if any(not 0.0 <= float(q) <= 1.0 for q in thresholds):
        raise ValueError(f"--exit_thresholds: Q-exit thresholds must lie in [0, 1], got {list(thresholds)}")
    return tuple(float(q) for q in thresholds)


def _sweep_fn(model, num_loops: int, q_loops: int):
    """jit(params, input_ids [B, S], targets [B, S], weights [B, S], thresholds [Q]) -> (sum of target
    log-probs [L, B], all targets greedy [L, B]) at every loop, then (log-probs [Q, B], greedy [Q, B],
    loops run by the targets [Q, B]) under Q-exit over the first `q_loops` loops; one forward of L loops."""
    graphdef = nnx.graphdef(model)

    def sweep(params, input_ids, targets, weights, thresholds):
        logp, greedy, gate_logits = token_scores(nnx.merge(graphdef, params), input_ids, targets, num_loops)
        per_loop = jax.vmap(lambda loop: row_scores(logp, greedy, loop, weights)[:2])(jnp.arange(num_loops))
        q_exit = jax.vmap(lambda q: exits.q_exit_loop(gate_logits[:q_loops], q))(thresholds)
        per_q = jax.vmap(lambda loop: row_scores(logp, greedy, loop, weights))(q_exit)
        return (*per_loop, *per_q)

    return jax.jit(sweep)


def _key(row: Row) -> bytes:
    inputs, targets = row
    return hashlib.blake2b(np.asarray([*inputs, targets[-1], len(targets)], np.int64).tobytes(),
                           digest_size=16).digest()


class LoopSweepLM(OuroLM):
    """The native lm-eval model answering at one selected depth (`select`) at a time; scoring requests
    come from a table that one forward of the largest loop count fills (module docstring)."""

    def __init__(self, pretrained: str, loops: Sequence[int], exit_thresholds: Sequence[float] = (),
                 **model_args):
        """model_args: the native model's (dtype, batch_size, tokenizer, prefix_token_id, max_length,
        max_gen_toks); the depth is the sweep's."""
        exit_thresholds = check_thresholds(exit_thresholds)
        super().__init__(pretrained, num_loops=max(loops), **model_args)
        self.loops, self.exit_thresholds = sorted(set(loops)), exit_thresholds
        self.q_loops = min(self.trained_loops, max(loops))
        self._full = self.model
        self._sweep = _sweep_fn(self.model, max(loops), self.q_loops)
        self._thresholds = jnp.asarray(self.exit_thresholds or (1.0,), jnp.float32)
        self._table: dict[bytes, tuple[np.ndarray, ...]] = {}
        self.selection: Selection = ("loop", max(loops))

    def selections(self) -> list[Selection]:
        return [("loop", k) for k in self.loops] + [("q_exit", q) for q in self.exit_thresholds]

    def select(self, kind: str, value: float) -> None:
        """Answer as the native model at loop k (`kind` "loop") or with Q-exit threshold q ("q_exit");
        resets `mean_loops`."""
        self.selection = (kind, value)
        self.reset_depth()

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """One generation at the selected depth: loop k runs max(k, T) loops' model with exit_at_loop=k,
        Q-exit the model of `q_loops` loops with exit_threshold=q."""
        kind, value = self.selection
        loops = max(int(value), self.trained_loops) if kind == "loop" else self.q_loops
        self.model = with_num_loops(self._full, loops)
        self.exit_at_loop = int(value) if kind == "loop" else None
        self.exit_threshold = float(value) if kind == "q_exit" else None
        return super().generate_until(requests, disable_tqdm)

    def _score_rows(self, rows: Sequence[Row], disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        """Scores at the selected depth; rows not yet in the table run one forward of every loop first."""
        keys = [_key(row) for row in rows]
        todo = {key: row for key, row in zip(keys, rows, strict=True) if key not in self._table}
        todo_keys, todo_rows = list(todo), list(todo.values())
        for members, *arrays in self._batches(todo_rows, disable_tqdm):
            out = jax.device_get(self._sweep(self._params, *arrays, self._thresholds))
            for r, i in enumerate(members):
                self._table[todo_keys[i]] = tuple(np.asarray(a[:, r]) for a in out)
        kind, value = self.selection
        results = []
        for key, (_, targets) in zip(keys, rows, strict=True):
            logp, greedy, q_logp, q_greedy, q_depth = self._table[key]
            if kind == "loop":
                k = int(value) - 1
                results.append((float(logp[k]), bool(greedy[k])))
                self.depth_total += (k + 1) * len(targets)
            else:
                j = self.exit_thresholds.index(value)
                results.append((float(q_logp[j]), bool(q_greedy[j])))
                self.depth_total += float(q_depth[j])
            self.depth_tokens += len(targets)
        return results


def load_tasks(manager, names: Sequence[str]) -> dict[str, Any]:
    """Task names (tasks, groups, tags) -> {name: lm-eval Task or Group}, a tag expanded to its tasks.
    ValueError for names lm-eval does not know."""
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown task{'s' * (len(unknown) > 1)}: {', '.join(unknown)} (see "
                         "`python -m ouro_jax.evaluate.lm_eval ls tasks`; local YAMLs need --include_path)")
    built = {}
    for name in names:
        loaded = manager.load(name)
        if name in loaded["groups"]:
            built[name] = loaded["groups"][name]
        else:
            built.update({name: loaded["tasks"][name]} if name in loaded["tasks"] else loaded["tasks"])
    return built


def write_local_tasks(directory: str | os.PathLike, data_file: str | os.PathLike) -> list[str]:
    """Offline lm-eval task YAMLs in `directory` over a .jsonl of {"question", "choices", "answer",
    "text"} documents (e.g. the repository's notebooks/tasks/loop_smoke.jsonl): `loop_smoke_mc`
    (multiple choice, acc / acc_norm), `loop_smoke_rolling` (loglikelihood_rolling of "text": word and
    byte perplexity, bits per byte) and `loop_smoke_gen` (greedy generate_until of 8 tokens, exact match
    against the right choice). Returns the task names (use --include_path=directory)."""
    os.makedirs(directory, exist_ok=True)
    common = ("dataset_path: json\ndataset_kwargs:\n  data_files:\n"
              f"    test: {json.dumps(os.path.abspath(data_file))}\ntest_split: test\n")
    bodies = {
        "loop_smoke_mc": "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: choices\n"
                         "doc_to_target: answer\nmetric_list:\n"
                         "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
                         "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n",
        "loop_smoke_rolling": "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
                              "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n"
                              "  - metric: byte_perplexity\n  - metric: bits_per_byte\n",
        "loop_smoke_gen": "output_type: generate_until\ndoc_to_text: '{{question}}'\n"
                          "doc_to_target: '{{choices[answer]}}'\ngeneration_kwargs:\n  until: [\"\\n\"]\n"
                          "  max_gen_toks: 8\n  do_sample: false\nmetric_list:\n"
                          "  - {metric: exact_match, aggregation: mean, higher_is_better: true}\n",
    }
    for name, body in bodies.items():
        with open(os.path.join(directory, f"{name}.yaml"), "w") as f:
            f.write(f"task: {name}\n{common}{body}")
    return list(bodies)


def _metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """lm-eval's result entry of one task -> its metrics ("acc,none": value, ...), stderrs left out."""
    return {k: float(v) for k, v in result.items()
            if "," in k and "_stderr" not in k and isinstance(v, int | float)}


def _evaluate_again(lm: LoopSweepLM, task, manager, limit: int | None) -> dict[str, Any]:
    """`lm_eval.simple_evaluate` of a task it has configured before: the same seeds (so few-shot examples,
    hence requests, are the same), then lm-eval's `evaluate`."""
    import random

    from lm_eval import evaluator
    from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED

    random.seed(DEFAULT_RANDOM_SEED)
    np.random.seed(DEFAULT_OTHER_SEED)  # noqa: NPY002 - lm-eval draws from numpy's global generator
    loaded = manager.load([task])
    for leaf in loaded["tasks"].values():
        leaf.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
    return evaluator.evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=0, log_samples=False,
                              verbosity="ERROR")


def sweep(lm: LoopSweepLM, tasks: Mapping[str, Any], manager, *, limit: int | None = None,
          num_fewshot: int | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every task's metric at each of `lm.selections()`, in the tasks.json layout (module docstring);
    "metrics" holds every metric lm-eval reports, per depth ("loop k" / "q=Q")."""
    import lm_eval

    out = {}
    for name, task in tasks.items():
        start = time.perf_counter()
        entry: dict[str, Any] = {"loops": {}, "q_exit": {}, "metrics": {}}
        for i, (kind, value) in enumerate(lm.selections()):
            lm.select(kind, value)
            if i == 0:  # lm-eval's own configuration of the task (few-shot count, seeds), kept by the task
                result = lm_eval.simple_evaluate(
                    model=lm, tasks=[task], task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                    bootstrap_iters=0, log_samples=False, verbosity="ERROR")
            else:  # the same evaluation without simple_evaluate's environment report (seconds per call)
                result = _evaluate_again(lm, task, manager, limit)
            metrics = _metrics(result["results"][name])
            metric = entry.setdefault("metric", next(iter(metrics)))
            if kind == "loop":
                entry["loops"][str(value)] = metrics[metric]
                entry["metrics"][f"loop {value}"] = metrics
            else:
                entry["q_exit"][f"{value:g}"] = {"value": metrics[metric], "mean_loops": lm.mean_loops}
                entry["metrics"][f"q={value:g}"] = metrics
        entry["seconds"] = time.perf_counter() - start
        out[name] = entry
        if log:
            log(f"{name}: {entry['metric']} at loops {', '.join(f'{v:.4f}' for v in entry['loops'].values())}"
                f" ({entry['seconds']:.1f} s)")
    return out


def markdown_table(results: Mapping[str, Any], trained_loops: int) -> str:
    """One row per task: the metric at every loop (trained T in bold), then every Q-exit value with its
    mean loops."""
    loops = sorted({int(k) for r in results.values() for k in r["loops"]})
    qs = sorted({q for r in results.values() for q in r["q_exit"]}, key=float)
    head = ["task", "metric", *[f"**T={k}**" if k == trained_loops else f"T={k}" for k in loops],
            *[f"Q-exit q={q}" for q in qs]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        cells = [name, r["metric"],
                 *[f"{r['loops'][str(k)]:.4f}" if str(k) in r["loops"] else "" for k in loops]]
        cells += [f"{r['q_exit'][q]['value']:.4f} ({r['q_exit'][q]['mean_loops']:.2f} loops)"
                  if q in r["q_exit"] else "" for q in qs]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figures(results: Mapping[str, Any], trained_loops: int, title: str = "") -> dict:
    """`metric_vs_loops` (one panel per task) and `metric_vs_mean_loops` (static exits and Q-exit, one
    panel per task) as matplotlib Figures."""
    from matplotlib.figure import Figure

    from ouro_jax.evaluate import plots

    names = list(results)
    figs = {}
    for fig_name in ("metric_vs_loops", "metric_vs_mean_loops"):
        fig = Figure(figsize=(4.2 * len(names), 3.6), layout="constrained")
        axes = np.atleast_1d(fig.subplots(1, len(names)))
        for ax, name in zip(axes, names, strict=True):
            r = results[name]
            loops = sorted(int(k) for k in r["loops"])
            ax.plot(loops, [r["loops"][str(k)] for k in loops], "s-", color=plots.COLORS["static"],
                    label=plots.NAMES["static"])
            if fig_name == "metric_vs_loops":
                plots._mark_trained(ax, trained_loops, max(loops))
                ax.set(xlabel="loops", xticks=loops)
            else:
                q = sorted(r["q_exit"].values(), key=lambda v: v["mean_loops"])
                ax.plot([v["mean_loops"] for v in q], [v["value"] for v in q], "o-",
                        color=plots.COLORS["q_exit"], label=plots.NAMES["q_exit"])
                ax.set(xlabel="mean loops")
                ax.legend(fontsize=8)
            ax.set(ylabel=r["metric"], title=name)
            ax.grid(alpha=0.3)
        if title:
            fig.suptitle(title)
        figs[fig_name] = fig
    return figs


def write(results: Mapping[str, Any], output_dir: str, *, trained_loops: int, title: str = "") -> list[str]:
    """DIR/tasks.json (written whole, then renamed into place), DIR/tasks.md and the plots; their paths."""
    from ouro_jax.evaluate import plots

    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "tasks.json")
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=2)
    os.replace(path + ".tmp", path)
    table = os.path.join(output_dir, "tasks.md")
    with open(table, "w") as f:
        f.write(markdown_table(results, trained_loops) + "\n")
    return [path, table, *plots.save(figures(results, trained_loops, title), output_dir)]
