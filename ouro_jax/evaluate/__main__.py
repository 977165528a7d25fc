"""`python -m ouro_jax.evaluate --model=PATH [--data=...] --output_dir=DIR [--extra_loops=K]`
`python -m ouro_jax.evaluate --model=PATH --tasks=TASKS [--include_path=DIR] [--loops=1-8]
    [--exit_thresholds=0.3,0.5,0.7,0.9] [--limit=N] [--num_fewshot=K] --output_dir=DIR`

Evaluates a looped model loop by loop (arXiv:2510.25741 §5.4.1): for loops 1..T (and T+1..T+K with
--extra_loops=K) the cross-entropy, perplexity, token accuracy and, on the synthetic tasks, answer
accuracy; the gate's exit distribution; and for Q-exit over a grid of q, static exits and the hidden-state
rules (absolute and relative) the accuracy / CE and mean depth. Prints one markdown table and writes
DIR/metrics.json and DIR/{accuracy_vs_depth,exit_histogram,per_loop}.png.

On several processes (`--coordinator_address/--num_processes/--process_id`, or detected as for training:
`ouro_jax.distributed`) each evaluates its share of the batches and process 0 writes the one-process result.

PATH: a run directory (its latest checkpoint), one of its steps (RUN/checkpoints/<step>) or a Hugging Face
Ouro directory.

With --tasks: lm-evaluation-harness tasks per loop from one pass (`ouro_jax.evaluate.tasks`): every task's
metric at each loop count of --loops and under each Q-exit threshold, in DIR/tasks.json, DIR/tasks.md and
two plots; --batch_size, --dtype and --tokenizer apply as to the lm-eval model.

--data: empty for a run's own held-out data; a synthetic task name (e.g. phop); chat .jsonl files
({"messages": ...} or {"prompt", "completion"} lines: loss and accuracy on the assistant tokens only, or
on --chat_mask's, e.g. user for the tokens an SFT run leaves untrained); or
.txt / .jsonl files (comma-separated paths or globs), tokenised with the model's own tokenizer
(`run.tokenizer_of`: PATH/tokenizer.json, else the run's data.tokenizer, else Ouro's; --tokenizer overrides).
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import flags

from ouro_jax import cli, distributed  # distributed: its flags
from ouro_jax.tokenizer import CHAT_MASKS

_MODEL = flags.DEFINE_string("model", None, "Run directory, step directory or Hugging Face Ouro directory.")
_DATA = flags.DEFINE_string("data", "", "Empty: the run's held-out data; a task name (phop, ...); or "
                            ".txt/.jsonl files (comma-separated).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where metrics.json and the PNG plots go.")
_EXTRA_LOOPS = flags.DEFINE_integer("extra_loops", 0, "Also run loops T+1..T+K (extrapolation).",
                                    lower_bound=0)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Rows per batch (default: the run's, or 8 for text).",
                                   lower_bound=1)
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "Tokens per row (default: the run's / task's, or 256 for "
                                "text).", lower_bound=2)
_NUM_BATCHES = flags.DEFINE_integer("num_batches", None, "Batches to evaluate (default: the run's "
                                    "eval_batches, 8 for a task, all of text files).", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of a task's held-out examples (--data=TASK).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "'ouro' or a tokenizer.json for text data "
                                 "(default: the model's own, `run.tokenizer_of`).")
_CHAT_MASK = flags.DEFINE_enum("chat_mask", "assistant", list(CHAT_MASKS), "The tokens of chat --data "
                                "scored: assistant (what SFT trains), last_assistant, all, or user.")
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "Field holding the text in .jsonl lines.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and compute dtype.")
_Q = flags.DEFINE_list("q", None, "Q-exit thresholds in [0, 1] (default 0.05,0.1,0.2,...,0.9,0.95,0.99).")
_HIDDEN_DELTA = flags.DEFINE_list("hidden_delta_eps", None, "Thresholds of ||h_t - h_t-1||_2 (default: the "
                                "relative grid times sqrt(hidden_size)).")
_HIDDEN_DELTA_RELATIVE = flags.DEFINE_list("hidden_delta_relative_eps", None, "Thresholds of "
                                           "||h_t - h_t-1|| / ||h_t-1|| (default 0.01,...,0.8,1.0).")
_TASKS = flags.DEFINE_list("tasks", None, "lm-eval tasks, groups or tags to evaluate per loop (instead of "
                           "--data).")
_INCLUDE_PATH = flags.DEFINE_string("include_path", None, "A directory of local lm-eval task YAMLs "
                                    "(--tasks).")
_LOOPS = flags.DEFINE_string("loops", "1-8", "Loop counts of --tasks: ranges and counts in 1..32, e.g. 1-8 "
                             "or 1,2,4.")
_EXIT_THRESHOLDS = flags.DEFINE_list("exit_thresholds", ["0.3", "0.5", "0.7", "0.9"],
                                     "Q-exit thresholds of --tasks (empty: none).")
_LIMIT = flags.DEFINE_integer("limit", None, "Documents per task (--tasks; default all).", lower_bound=1)
_NUM_FEWSHOT = flags.DEFINE_integer("num_fewshot", None, "Few-shot examples (--tasks; default the task's).",
                                    lower_bound=0)
flags.mark_flags_as_required(["model", "output_dir"])


class _Progress:
    """`evaluate [########------------] 12/32 batches  3.1 batches/s  ETA 0m06s` on stderr, redrawn in place
    on a terminal, else a line every 10 seconds and at the end."""

    def __init__(self, total: int, unit: str = "batches"):
        self.total, self.unit, self.t0, self.last = total, unit, time.perf_counter(), 0.0
        self.tty = sys.stderr.isatty()

    def __call__(self, done: int) -> None:
        now = time.perf_counter() - self.t0
        if not self.tty and now - self.last < 10 and done != self.total:
            return
        self.last = now
        rate = done / max(now, 1e-9)
        eta = int((self.total - done) / rate) if rate else 0
        filled = 20 * done // max(self.total, 1)
        line = (f"evaluate [{'#' * filled}{'-' * (20 - filled)}] {done}/{self.total} {self.unit}  "
                f"{rate:.2f} batches/s  ETA {eta // 60}m{eta % 60:02d}s")
        sys.stderr.write(f"\r{line}" + ("\n" if done == self.total else "") if self.tty else f"{line}\n")
        sys.stderr.flush()


def _floats(values, name: str) -> tuple[float, ...] | None:
    if values is None:
        return None
    try:
        return tuple(float(v) for v in values)
    except ValueError:
        raise cli.UserError(f"--{name}: expected comma-separated numbers, got {','.join(values)}") from None


def _grid(hidden_size: int):
    from ouro_jax.evaluate import policies

    default = policies.Grid.default(hidden_size)
    chosen = {name: _floats(flag.value, flag.name) for name, flag in
              (("q", _Q), ("hidden_delta", _HIDDEN_DELTA), ("hidden_delta_relative", _HIDDEN_DELTA_RELATIVE))}
    return policies.Grid(**{name: getattr(default, name) if v is None else v for name, v in chosen.items()})


def _run_tasks() -> None:
    """--tasks: every input checked before the model loads, then `tasks.sweep` and `tasks.write`."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise cli.UserError("--tasks needs lm-evaluation-harness: pip install 'ouro_jax[eval]'") from None

    from ouro_jax.evaluate import tasks

    if _DATA.value:
        raise cli.UserError("give --tasks or --data, not both")
    loops = tasks.parse_loops(_LOOPS.value)
    thresholds = tasks.check_thresholds(_floats(_EXIT_THRESHOLDS.value, "exit_thresholds") or ())
    if _INCLUDE_PATH.value and not os.path.isdir(_INCLUDE_PATH.value):
        raise cli.UserError(f"--include_path: no such directory: {_INCLUDE_PATH.value}")
    manager = TaskManager(include_path=_INCLUDE_PATH.value)
    chosen = tasks.load_tasks(manager, _TASKS.value)
    model_args = {"dtype": _DTYPE.value, "batch_size": _BATCH_SIZE.value, "tokenizer": _TOKENIZER.value}
    lm = tasks.LoopSweepLM(_MODEL.value, loops, thresholds, **model_args)
    results = tasks.sweep(lm, chosen, manager, limit=_LIMIT.value, num_fewshot=_NUM_FEWSHOT.value,
                          log=lambda line: print(line, flush=True))
    name = os.path.basename(os.path.abspath(_MODEL.value))
    paths = tasks.write(results, _OUTPUT_DIR.value, trained_loops=lm.trained_loops, title=name)
    print(f"\n{name}: trained T={lm.trained_loops}; Q-exit over loops 1..{lm.q_loops}\n")
    print(tasks.markdown_table(results, lm.trained_loops))
    print("\nwrote " + ", ".join(paths))


def main(argv):
    del argv
    if _TASKS.value:
        return _run_tasks()
    distributed.initialize_from_flags()  # before anything touches a device; a no-op for one process
    import jax

    from ouro_jax import run
    from ouro_jax.convert.pretrained import from_pretrained
    from ouro_jax.evaluate import data, metrics, plots

    location = run.locate(_MODEL.value)
    model = from_pretrained(_MODEL.value, dtype=_DTYPE.value)
    config = model.config
    grid = _grid(config.hidden_size)
    tokenizer = _TOKENIZER.value or run.tokenizer_of(_MODEL.value) or "ouro"
    batches, description = data.load(
        _DATA.value, model_path=_MODEL.value, model_kind=location.kind, vocab_size=config.vocab_size,
        seed=_SEED.value, batch_size=_BATCH_SIZE.value, seq_len=_SEQ_LEN.value,
        num_batches=_NUM_BATCHES.value, tokenizer=tokenizer, field=_TEXT_FIELD.value,
        chat_mask=_CHAT_MASK.value)
    num_loops = config.total_ut_steps + _EXTRA_LOOPS.value
    primary = jax.process_index() == 0
    mine = len(metrics.process_share(len(batches)))
    result = metrics.evaluate(model, batches, grid, num_loops=num_loops,
                              progress=_Progress(mine, "batches" if mine == len(batches) else
                                                 f"of process 0's share of {len(batches)} batches")
                              if primary else None)
    if not primary:  # every process holds the result; process 0 writes and prints it
        return
    result = {"model": os.path.abspath(_MODEL.value), "data": description, **result}
    os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
    with open(os.path.join(_OUTPUT_DIR.value, "metrics.json"), "w") as f:
        json.dump(result, f, indent=2)
    paths = plots.save(plots.figures(result, title=f"{os.path.basename(os.path.abspath(_MODEL.value))}, "
                                     f"{description}"), _OUTPUT_DIR.value)
    print(f"{result['model']} on {description}: {int(result['num_tokens'])} tokens"
          + (f", {int(result['num_answers'])} answers" if result["num_answers"] else "")
          + f"; {num_loops} loops (trained {config.total_ut_steps}); gate: mean exit loop "
          f"{result['mean_exit_loop']:.2f}, exit entropy {result['entropy']:.3f}\n")
    print(metrics.markdown_table(result))
    print(f"\nwrote {os.path.join(_OUTPUT_DIR.value, 'metrics.json')}, " + ", ".join(paths))


if __name__ == "__main__":
    cli.run(main)
