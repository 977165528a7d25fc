"""`python -m ouro_jax.experiments --task=phop --models=1x1,1x4,4x1 --seeds=3 --output_dir=DIR`

Trains every run of a study (each in `DIR/runs/<name>-<hash>/`, skipped when it has a result), measures
each loop's answer accuracy on held-out data, and writes `DIR/results.json`, `DIR/results.md` and
`DIR/<task>_<study>.png`; prints the study's tables. Rerunning a killed command reruns only what is missing.

Studies:
  compare  every model x objective x seed (`--objectives=ouro,last_loop`; one-loop models once).
  beta     Stage I with each `--betas` entropy weight, looped models only.
  gate     Stage I, then Stage II (`--pairings`, `--gate_steps`) from it: Q-exit accuracy at equal depth.
"""

from __future__ import annotations

import os
import shlex
import sys
import time

from absl import flags

from ouro_jax import cli
from ouro_jax.data.tasks import TASKS

STUDIES = ("compare", "beta", "gate")
INTERRUPTED = 75
"""Exit status after SIGTERM / Ctrl-C saved the current run's checkpoint: rerun the command to resume."""

_TASK = flags.DEFINE_enum("task", "phop", list(TASKS), "Synthetic task.")
_STUDY = flags.DEFINE_enum("study", "compare", list(STUDIES), "What to vary (see the module docstring).")
_MODELS = flags.DEFINE_list("models", ["1x1", "1x4", "4x1"], "KxL = K layers looped L times.")
_OBJECTIVES = flags.DEFINE_list(
    "objectives", ["ouro", "last_loop"], "compare: 'ouro' (Stage I, all loops), 'last_loop' (its CE only).")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds 0..N-1 per configuration.", lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", 1500, "Optimiser steps per run.", lower_bound=1)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where runs, results.json/.md and PNGs go.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 0, "Row length (0: the task's default).", lower_bound=0)
_TASK_SETTINGS = flags.DEFINE_list(
    "task_settings", [], "The task's own settings, key=value (keys of data.<task>, e.g. p=4,p_min=1).")
_SET = flags.DEFINE_list("set", [], "Any other config key, key=value (e.g. optimizer.learning_rate=1e-3).")
_BETAS = flags.DEFINE_list("betas", ["0", "0.05", "0.1"], "beta: the entropy weights.")
_PAIRINGS = flags.DEFINE_list("pairings", ["printed", "next"], "gate: Stage II target pairings.")
_GATE_STEPS = flags.DEFINE_integer("gate_steps", 300, "gate: Stage II steps.", lower_bound=1)
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 32, "Held-out batches measured per run.", lower_bound=1)
flags.mark_flag_as_required("output_dir")


def _pairs(items: list[str], what: str) -> dict:
    from ouro_jax.experiments.plan import parse_value

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise cli.UserError(f"--{what}: {item!r} is not key=value")
        out[key.strip()] = parse_value(value.strip())
    return out


def main(argv):
    del argv
    from ouro_jax.experiments import plan, report, suite, summary
    from ouro_jax.train import loop

    models = _MODELS.value
    for model in models:
        plan.parse_model(model)
    task_cfg = plan.task_config(_TASK.value, steps=_STEPS.value, seq_len=_SEQ_LEN.value,
                                settings=_pairs(_TASK_SETTINGS.value, "task_settings"),
                                overrides=_pairs(_SET.value, "set"))
    seeds = list(range(_SEEDS.value))
    looped = [m for m in models if plan.parse_model(m)[1] > 1]
    if _STUDY.value != "compare" and not looped:
        raise cli.UserError(f"--study={_STUDY.value} needs a looped model (L > 1) in --models")
    if _STUDY.value == "compare":
        runs = plan.compare_runs(task_cfg, models, _OBJECTIVES.value, seeds, _TASK.value)
    elif _STUDY.value == "beta":
        try:
            betas = [float(b) for b in _BETAS.value]
        except ValueError:
            raise cli.UserError(f"--betas: {_BETAS.value} are not numbers") from None
        runs = plan.beta_runs(task_cfg, looped, betas, seeds, _TASK.value)
    else:
        runs = plan.gate_runs(task_cfg, looped, _PAIRINGS.value, seeds, _TASK.value, _GATE_STEPS.value)

    output_dir = _OUTPUT_DIR.value
    os.makedirs(output_dir, exist_ok=True)
    cached = sum(suite.cached_result(output_dir, r) is not None for r in runs)
    start = time.perf_counter()
    name = f"{_TASK.value}/{_STUDY.value}"

    def write_section(results: dict) -> dict:  # after every finished run, so a partial suite has a report
        # a run shared by two studies (beta = 0.1 is also the compare run) is labelled by this one
        done = [{**results[r.key], "setting": r.setting} for r in runs if r.key in results]
        section = summary.STUDIES[_STUDY.value](done)
        section.update(command="python -m ouro_jax.experiments " + shlex.join(sys.argv[1:]),
                       wall_s=sum(r["train_wall_s"] + r["measure_wall_s"] for r in done),
                       cpu_s=sum(r["train_cpu_s"] for r in done if "train_cpu_s" in r),
                       cpu_runs=sum("train_cpu_s" in r for r in done),
                       invocation_s=time.perf_counter() - start, runs_trained=len(done) - cached,
                       runs_cached=cached, runs_missing=len(runs) - len(done),
                       settings={"task": _TASK.value, "steps": _STEPS.value, "seeds": seeds,
                                 "data": task_cfg.data[_TASK.value].to_dict(),
                                 "seq_len": task_cfg.data.seq_len})
        return report.write(output_dir, name, section)[name]

    try:
        results = suite.execute(runs, output_dir, num_batches=_EVAL_BATCHES.value,
                                log=lambda line: print(line, flush=True), after_each=write_section)
    except loop.Interrupted as err:
        print(f"stopped: {err}", file=sys.stderr)
        return INTERRUPTED
    print(report.section_markdown(name, write_section(results)))


if __name__ == "__main__":
    cli.run(main)
