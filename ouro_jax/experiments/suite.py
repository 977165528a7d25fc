"""Execute runs with a result cache: each run trains in its own directory `DIR/runs/<run.key>/` and ends
with `result.json` (its identity, wall and CPU times and `measure`'s figures), written atomically last.
CPU time (all threads of this process) is reported beside wall time because on a shared machine the
wall time mostly measures the other processes.

A rerun of the same suite skips every run that has `result.json`; a run killed mid-training resumes from
its latest checkpoint (`ouro_jax.train.loop.train` resumes by itself); a run killed after its last
checkpoint but before measuring is only measured. So a killed suite reruns only what is missing.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import ml_collections

from ouro_jax import run as run_lib
from ouro_jax.experiments import measure as measure_lib
from ouro_jax.experiments import plan

RESULT = "result.json"


def run_dir(output_dir: str, run: plan.Run) -> str:
    return os.path.join(output_dir, "runs", run.key)


def _write_json(path: str, data) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)


def cached_result(output_dir: str, run: plan.Run) -> dict | None:
    path = os.path.join(run_dir(output_dir, run), RESULT)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def execute(runs: list[plan.Run], output_dir: str, *, train_fn: Callable | None = None,
            num_batches: int = 32, log: Callable[[str], None] = print,
            after_each: Callable[[dict], None] | None = None) -> dict[str, dict]:
    """Train and measure every run that has no result yet (parents before children, as listed).

    train_fn(config, workdir): the trainer, `ouro_jax.train.loop.train` by default (tests wrap it).
    after_each(results so far) is called after every newly finished run. Returns {run.key: result}.
    """
    if train_fn is None:
        from ouro_jax.train import loop

        train_fn = loop.train
    results = {}
    for number, run in enumerate(runs, 1):
        cached = cached_result(output_dir, run)
        if cached is not None:
            results[run.key] = cached
            log(f"[{number}/{len(runs)}] {run.label}: done before (wall {cached['train_wall_s']:.0f} s)")
            continue
        workdir = run_dir(output_dir, run)
        step = run_lib.latest_step(workdir)
        resumed = step is not None
        config = run.config
        if run.parent is not None:
            config = ml_collections.ConfigDict(config.to_dict())
            config.init_from = os.path.abspath(run_dir(output_dir, run.parent))
        log(f"[{number}/{len(runs)}] {run.label}: "
            + ("trained before, measuring" if step == config.total_steps else
               f"{'resuming' if resumed else 'training'} {config.total_steps} steps in {workdir}"))
        start, start_cpu = time.perf_counter(), time.process_time()
        if step != config.total_steps:
            train_fn(config, workdir)
        trained, trained_cpu = time.perf_counter(), time.process_time()
        figures = measure_lib.measure(workdir, config, num_batches=num_batches)
        result = {**plan.describe(run), "resumed": resumed, "train_wall_s": trained - start,
                  "train_cpu_s": trained_cpu - start_cpu, "measure_wall_s": time.perf_counter() - trained,
                  **figures}
        _write_json(os.path.join(workdir, RESULT), result)
        results[run.key] = result
        last = figures["answer_accuracy"][-1]
        log(f"[{number}/{len(runs)}] {run.label}: answer accuracy {100 * last:.1f}% at the last loop, "
            f"trained in {result['train_wall_s']:.0f} s")
        if after_each is not None:
            after_each(results)
    return results
