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
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from concurrent import futures

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


def _execute_one(run: plan.Run, output_dir: str, train_fn: Callable | None, num_batches: int) -> dict:
    """Train (or resume) and measure one run; writes and returns its result."""
    if train_fn is None:
        from ouro_jax.train import loop

        train_fn = loop.train
    workdir = run_dir(output_dir, run)
    step = run_lib.latest_step(workdir)
    config = run.config
    if run.parent is not None:
        config = ml_collections.ConfigDict(config.to_dict())
        config.init_from = os.path.abspath(run_dir(output_dir, run.parent))
    start, start_cpu = time.perf_counter(), time.process_time()
    if step != config.total_steps:
        train_fn(config, workdir)
    trained, trained_cpu = time.perf_counter(), time.process_time()
    figures = measure_lib.measure(workdir, config, num_batches=num_batches)
    result = {**plan.describe(run), "resumed": step is not None, "train_wall_s": trained - start,
              "train_cpu_s": trained_cpu - start_cpu, "measure_wall_s": time.perf_counter() - trained,
              **figures}
    _write_json(os.path.join(workdir, RESULT), result)
    return result


def _starting(run: plan.Run, output_dir: str) -> str:
    step = run_lib.latest_step(run_dir(output_dir, run))
    if step == run.config.total_steps:
        return "trained before, measuring"
    return f"{'resuming' if step is not None else 'training'} {run.config.total_steps} steps in " \
           f"{run_dir(output_dir, run)}"


def _cost(run: plan.Run) -> float:
    """A run's training cost, steps x layers x loops x row length (distinct layers weighing a little
    more): workers take the costliest ready run first, so that the suite does not end on one long run."""
    layers, loops = plan.parse_model(run.model)
    return run.config.total_steps * layers * loops * (1.0 + 0.1 * layers) * run.config.data.seq_len


def _pin_worker(counter, cores: list[int]) -> None:
    """Process-pool initializer: the i-th worker runs on core cores[i % len(cores)] only (before XLA
    creates its thread pool), so that parallel runs do not oversubscribe the cores."""
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    os.sched_setaffinity(0, {cores[index % len(cores)]})


def execute(runs: list[plan.Run], output_dir: str, *, train_fn: Callable | None = None,
            num_batches: int = 32, log: Callable[[str], None] = print,
            after_each: Callable[[dict, plan.Run], None] | None = None, workers: int = 1) -> dict[str, dict]:
    """Train and measure every run that has no result yet (a run with a parent after the parent).

    train_fn(config, workdir): the trainer, `ouro_jax.train.loop.train` by default (tests wrap it; only
    with workers = 1). workers > 1: that many runs at a time, each in its own spawned process pinned to
    one core where the OS allows (Linux), the costliest ready run (`_cost`) first. after_each(results so
    far, the run just finished) is called after every newly finished run. Returns {run.key: result}.
    """
    results, todo, keys = {}, [], set()
    for number, run in enumerate(runs, 1):
        if run.key in keys:  # the same config in two studies is one run
            continue
        keys.add(run.key)
        cached = cached_result(output_dir, run)
        if cached is None:
            todo.append((number, run))
            continue
        results[run.key] = cached
        log(f"[{number}/{len(runs)}] {run.label}: done before (wall {cached['train_wall_s']:.0f} s)")

    def finished(number: int, run: plan.Run, result: dict) -> None:
        results[run.key] = result
        log(f"[{number}/{len(runs)}] {run.label}: answer accuracy {100 * result['answer_accuracy'][-1]:.1f}% "
            f"at the last loop, trained in {result['train_wall_s']:.0f} s")
        if after_each is not None:
            after_each(results, run)

    if workers <= 1:
        for number, run in todo:
            log(f"[{number}/{len(runs)}] {run.label}: {_starting(run, output_dir)}")
            finished(number, run, _execute_one(run, output_dir, train_fn, num_batches))
        return results
    if train_fn is not None:
        raise ValueError("train_fn needs workers = 1 (the workers are separate processes)")
    context = multiprocessing.get_context("spawn")  # never fork a process that has started XLA
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    pin = {}
    if len(cores) >= workers:
        pin = {"initializer": _pin_worker, "initargs": (context.Value("i", 0), cores)}
    running: dict[futures.Future, tuple[int, plan.Run]] = {}
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        with futures.ProcessPoolExecutor(workers, mp_context=context, **pin) as pool:
            try:
                while todo or running:
                    ready = sorted(((n, r) for n, r in todo if r.parent is None or r.parent.key in results),
                                   key=lambda item: -_cost(item[1]))
                    for number, run in ready[:workers - len(running)]:
                        todo.remove((number, run))
                        log(f"[{number}/{len(runs)}] {run.label}: {_starting(run, output_dir)}")
                        running[pool.submit(_execute_one, run, output_dir, None, num_batches)] = (number, run)
                    if not running:
                        missing = ", ".join(r.label for _, r in todo)
                        raise ValueError(f"runs whose parent is not in the suite: {missing}")
                    done, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
                    failures = []
                    for future in done:  # record every finished run before raising a failure
                        number, run = running.pop(future)
                        if future.exception() is None:
                            finished(number, run, future.result())
                        else:
                            log(f"[{number}/{len(runs)}] {run.label}: failed: {future.exception()}")
                            failures.append(future.exception())
                    if failures:
                        raise failures[0]
            except BaseException:  # each other worker saves its run's checkpoint at its next step, stops
                for child in multiprocessing.active_children():
                    child.terminate()
                raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return results


def _raise_interrupt(signum, frame):
    del signum, frame
    raise KeyboardInterrupt
