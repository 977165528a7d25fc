"""`python -m ouro_jax.experiments --task=phop --models=1x1,1x4,4x1 --seeds=3 --output_dir=DIR`

Trains every run of a study (each in `DIR/runs/<name>-<hash>/`, skipped when it has a result), measures
each loop's answer accuracy on held-out data, and writes `DIR/results.json`, `DIR/results.md` and
`DIR/<task>_<study>.png`; prints the study's tables. Rerunning a killed command reruns only what is missing.

Studies:
  compare  every model x objective x seed (`--objectives=ouro,last_loop`; one-loop models once).
  beta     Stage I with each `--betas` entropy weight, looped models only.
  gate     Stage I, then Stage II (`--pairings`, `--gate_steps`) from it: Q-exit accuracy at equal depth.
  all      every study of docs/experiments.md with its settings (`plan.SUITE`), one results.md for all;
           `--steps`, `--eval_batches` and `--workers` apply, the other study flags are refused.
"""

from __future__ import annotations

import os
import shlex
import sys
import time

from absl import flags

from ouro_jax import cli
from ouro_jax.data.tasks import TASKS

STUDIES = ("compare", "beta", "gate", "all")
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
_WORKERS = flags.DEFINE_integer("workers", 1, "Runs trained at a time, each in its own process pinned to "
                                "one core (Linux); with 2 on 2 cores the 24 runs of --study=all took "
                                "half their summed time.",
                                lower_bound=1)
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


STUDY_FLAGS = ("task", "models", "objectives", "seeds", "seq_len", "task_settings", "set", "betas",
               "pairings", "gate_steps")


def _section(values: dict, steps: int) -> dict:
    """One study from its flag values (`values[name]` for every name of STUDY_FLAGS, as flag texts or
    parsed): its name "task/study", runs, reproducing command and settings."""
    from ouro_jax.experiments import plan

    models = values["models"]
    for model in models:
        plan.parse_model(model)
    task, study = values["task"], values["study"]
    task_cfg = plan.task_config(task, steps=steps, seq_len=values["seq_len"],
                                settings=_pairs(values["task_settings"], "task_settings"),
                                overrides=_pairs(values["set"], "set"))
    try:
        betas = [float(b) for b in values["betas"]]
    except ValueError:
        raise cli.UserError(f"--betas: {values['betas']} are not numbers") from None
    seeds = list(range(values["seeds"]))
    runs = plan.study_runs(study, task_cfg, task, models, seeds, objectives=values["objectives"], betas=betas,
                           pairings=values["pairings"], gate_steps=values["gate_steps"])
    return {"name": f"{task}/{study}", "study": study, "runs": runs,
            "command": f"python -m ouro_jax.experiments {values['command']}",
            "settings": {"task": task, "steps": steps, "seeds": seeds,
                         "data": task_cfg.data[task].to_dict(), "seq_len": task_cfg.data.seq_len}}


def _suite_sections(output_dir: str) -> list[dict]:
    """`--study=all`: every study of `plan.SUITE` (the other study flags would be ignored: refused)."""
    from ouro_jax.experiments import plan

    given = [f"--{name}" for name in STUDY_FLAGS if flags.FLAGS[name].present]
    if given:
        raise cli.UserError(f"--study=all sets every study's own flags; drop {', '.join(given)}")
    sections = []
    for entry in plan.SUITE:
        values = {name: flags.FLAGS[name].default for name in STUDY_FLAGS}
        for name, text in entry.items():
            values[name] = flags.FLAGS[name].parser.parse(text) if name in values else text
        args = [f"--{name}={text}" for name, text in entry.items()]
        args += [f"--{flag.name}={flag.value}" for flag in (flags.FLAGS["steps"], flags.FLAGS["eval_batches"])
                 if flag.present]
        values["command"] = shlex.join([*args, f"--output_dir={output_dir}"])
        sections.append(_section(values, _STEPS.value))
    return sections


def main(argv):
    del argv
    from ouro_jax.experiments import report, suite, summary
    from ouro_jax.train import loop

    output_dir = _OUTPUT_DIR.value
    if _STUDY.value == "all":
        sections = _suite_sections(output_dir)
    else:
        values = {name: flags.FLAGS[name].value for name in STUDY_FLAGS}
        values.update(study=_STUDY.value, command=shlex.join(sys.argv[1:]))
        sections = [_section(values, _STEPS.value)]
    runs = [run for section in sections for run in section["runs"]]
    os.makedirs(output_dir, exist_ok=True)
    cached = {r.key for r in runs if suite.cached_result(output_dir, r) is not None}
    start = time.perf_counter()

    def write_section(section: dict, results: dict) -> dict:  # after each of its runs: partial reports
        # a run shared by two studies (beta = 0.1 is also the compare run) is labelled by this one
        done = [{**results[r.key], "setting": r.setting} for r in section["runs"] if r.key in results]
        figures = summary.STUDIES[section["study"]](done)
        trained = sum(r["key"] not in cached for r in done)
        figures.update(command=section["command"], settings=section["settings"],
                       wall_s=sum(r["train_wall_s"] + r["measure_wall_s"] for r in done),
                       cpu_s=sum(r["train_cpu_s"] for r in done if "train_cpu_s" in r),
                       cpu_runs=sum("train_cpu_s" in r for r in done),
                       invocation_s=time.perf_counter() - start, runs_trained=trained,
                       runs_cached=len(done) - trained, runs_missing=len(section["runs"]) - len(done))
        return report.write(output_dir, section["name"], figures)[section["name"]]

    def after_each(results: dict, run) -> None:
        for section in sections:
            if any(r.key == run.key for r in section["runs"]):
                write_section(section, results)

    try:
        results = suite.execute(runs, output_dir, num_batches=_EVAL_BATCHES.value, workers=_WORKERS.value,
                                log=lambda line: print(line, flush=True), after_each=after_each)
    except (loop.Interrupted, KeyboardInterrupt) as err:
        print(f"stopped: {err}" if isinstance(err, loop.Interrupted) else
              "stopped: interrupted; rerun the same command to resume", file=sys.stderr)
        return INTERRUPTED
    for section in sections:
        print(report.section_markdown(section["name"], write_section(section, results)))
    if len(sections) > 1:
        print(f"suite: {len(results)} runs, {time.perf_counter() - start:.0f} s of wall time")


if __name__ == "__main__":
    cli.run(main)
