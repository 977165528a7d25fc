"""The training loop: `train(config, workdir)`.

set-up (validate everything, lock the run, data, programs) -> resume, `init_from` or fresh state ->
steps (log, evaluate, checkpoint) -> final save. Rerunning the same command resumes from the latest
complete checkpoint and continues with the same data and the same results as an uninterrupted run.
SIGTERM or SIGINT (Ctrl-C) saves a checkpoint at the next step boundary and raises `Interrupted`; a
second Ctrl-C aborts at once.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from ouro_jax import distributed, run, sharding
from ouro_jax.convert.pretrained import hf_params
from ouro_jax.data import pipeline
from ouro_jax.train import config as config_lib
from ouro_jax.train import metrics as metrics_lib
from ouro_jax.train import program as program_lib
from ouro_jax.train.step import TrainState
from ouro_jax.train.upcycle import upcycle


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class Interrupted(Exception):
    """A signal stopped the run after its state was saved at `step` (rerun the command to resume)."""

    def __init__(self, signal_name: str, step: int):
        super().__init__(f"{signal_name}: saved step {step}; rerun the same command to resume")
        self.signal_name, self.step = signal_name, step

    def __reduce__(self):  # raised in a worker process of `experiments.suite`
        return Interrupted, (self.signal_name, self.step)


def _initial_params(config, resolved, program: program_lib.Program):
    """Parameters from `config.init_from` (a run, one of its steps or a Hugging Face Ouro directory;
    optionally upcycled to twice its layers), placed on the mesh."""
    source = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          program.abstract_params, program.param_shardings)  # any saving topology
    model = resolved.model
    if config.init_upcycle:
        model = model.replace(num_hidden_layers=model.num_hidden_layers // 2)
        source = {**source, "layers": jax.tree.map(
            lambda x: jax.ShapeDtypeStruct((model.num_hidden_layers, *x.shape[1:]), x.dtype,
                                           sharding=x.sharding), source["layers"])}
    if run.locate(config.init_from).kind == "hf":
        params = hf_params(config.init_from, model, source)
    else:
        params = run.restore_params(config.init_from, source)
    if config.init_upcycle:
        params = upcycle(params, factor=2, order=config.init_upcycle)
    return jax.device_put(params, program.param_shardings)


def _initial_state(config, resolved, program, checkpointer, data_iter) -> tuple[TrainState, int | None]:
    """(state, the step resumed from or None): the latest checkpoint, else `init_from`, else fresh."""
    resumed = checkpointer.latest_step()
    if resumed is not None:
        params, train = checkpointer.restore(resumed, *program.abstract_state.checkpoint_items(), data_iter)
        return TrainState.from_checkpoint_items(params, train), resumed
    if config.init_from:
        return program.state_from_params(_initial_params(config, resolved, program), config.seed), None
    return program.init(), None


def train(config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False) -> dict:
    """Train (or resume) the run in `workdir`; returns the last logged record.

    Everything that can fail on user input (config, data, mesh, workdir) fails before compiling, with
    `config.ConfigError` / `run.RunError` (one line). Raises `Interrupted` after a signal-triggered save
    and `TrainingDiverged` on a non-finite loss (the last good checkpoint is kept).
    """
    resolved = config_lib.validate(config, resuming=run.latest_step(workdir) is not None)
    run.check_resume(workdir, config, allow_change=allow_config_change)
    with _locked(workdir, config, allow_config_change):
        mesh = sharding.make_mesh(resolved.mesh)
        logging.info("%s", distributed.describe(mesh))
        if jax.process_count() > 1 and jax.process_index() == 0:
            print(distributed.describe(mesh), file=sys.stderr)
        data_iter = iter(pipeline.build_train_dataset(
            config.data, seed=config.seed, process_index=jax.process_index(),
            process_count=jax.process_count()))
        eval_batches = (pipeline.build_eval_batches(
            config.data, seed=config.seed, num_batches=config.data.eval_batches,
            process_index=jax.process_index(), process_count=jax.process_count())
            if config.eval_every_steps else [])
        eval_batches = _same_count_on_every_process(eval_batches, config.data)
        program = program_lib.build(config, resolved, mesh)
        with run.Checkpointer(workdir, max_to_keep=config.max_checkpoints_to_keep or None,
                              async_save=config.async_checkpointing) as checkpointer:
            state, resumed = _initial_state(config, resolved, program, checkpointer, data_iter)
            if jax.process_index() == 0:
                run.record_config(workdir, config, step=int(state.step))
            if resumed is not None and jax.process_index() == 0:
                print(f"resumed from step {resumed}", file=sys.stderr)
            writer = metrics_lib.MetricsWriter(workdir, resumed_step=resumed,
                                               is_primary=jax.process_index() == 0)
            try:
                return _steps(config, program, state, data_iter, eval_batches, checkpointer, writer)
            finally:
                writer.close()


@contextlib.contextmanager
def _locked(workdir: str, config, allow_change: bool):
    """Hold the run's lock (process 0) and check again that the run can continue. If any process cannot
    start, every process stops with one line: one that stopped alone would leave the others waiting in
    their first collective."""
    with contextlib.ExitStack() as held:
        failure = None
        try:
            held.enter_context(run.lock(workdir, primary=jax.process_index() == 0))
            run.check_resume(workdir, config, allow_change=allow_change)  # again, now that it is ours
        except run.RunError as err:
            failure = err
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            failed = np.flatnonzero(multihost_utils.process_allgather(np.array(failure is not None)))
            if failure is None and failed.size:
                raise run.RunError(f"process {failed[0]} could not start the run (its error says why)")
        if failure is not None:
            raise failure
        yield


def _same_count_on_every_process(batches: list[dict], data) -> list[dict]:
    """This process's eval batches, padded with empty batches (loss_mask 0, so they weigh nothing) to the
    most any process holds: each eval step is a collective that every process must run."""
    if jax.process_count() == 1:
        return batches
    from jax.experimental import multihost_utils

    most = int(np.max(multihost_utils.process_allgather(np.array(len(batches)))))
    rows = data.batch_size // jax.process_count()
    empty = {key: np.zeros((rows, data.seq_len), np.int32) for key in pipeline.BATCH_KEYS}
    return batches + [empty] * (most - len(batches))


def _steps(config, program, state, data_iter, eval_batches, checkpointer, writer) -> dict:
    """Run optimiser steps up to `config.total_steps`; returns the last logged record."""
    eval_batches = [sharding.put_batch(b, program.batch_sharding) for b in eval_batches]
    stop = run.StopRequests()
    step = int(state.step)
    progress = metrics_lib.Progress(config.total_steps, step, enabled=jax.process_index() == 0)
    last_log_time, last_log_step = time.perf_counter(), step
    tokens_per_step = config.data.batch_size * config.data.seq_len
    sources = pipeline.mixture_counter(config.data)  # tokens per mixture source, from the batches
    record: dict = {}
    save = lambda: checkpointer.save(int(state.step), *state.checkpoint_items(), data_iter)
    try:
        while step < config.total_steps:
            batch = next(data_iter)
            sources.add(batch)  # pops a mixture's source_ids
            batch = sharding.put_batch(batch, program.batch_sharding)
            state, step_metrics = program.train_step(state, batch)
            step += 1
            headline = metrics_lib.headline(step_metrics)  # a host sync: a NaN is caught before it is saved
            if not math.isfinite(headline["loss"]):
                raise TrainingDiverged(
                    f"loss is {headline['loss']} at step {step}; stopped, last good checkpoint: "
                    f"{checkpointer.latest_step()} in {checkpointer.directory}")
            progress.update(step, headline)
            logged = {}
            if step % config.log_every_steps == 0 or step == config.total_steps:
                now = time.perf_counter()
                logged.update(metrics_lib.flatten(jax.device_get(step_metrics)))
                logged["tokens_per_s"] = tokens_per_step * (step - last_log_step) / (now - last_log_time)
                logged.update(sources.flush())
                last_log_time, last_log_step = now, step
            if eval_batches and (step % config.eval_every_steps == 0 or step == config.total_steps):
                per_loop = evaluate(program.eval_step, state.params, eval_batches)
                logged.update(metrics_lib.flatten(per_loop, prefix="eval_"))
                writer.add_eval_figures(step, per_loop)
                progress.note(metrics_lib.held_out({"step": step, **logged}))
            if logged:
                writer.write(step, logged)
                record = {"step": step, **logged}
            stopping = stop.check()
            if stopping or step == config.total_steps or (
                    config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0):
                save()
            if stopping:
                raise Interrupted(stop.requested or "signal", step)
    finally:
        stop.close()
        progress.close()
    return record


def evaluate(eval_step, params, batches) -> dict[str, np.ndarray]:
    """Token-weighted means of the eval metrics over `batches` (per-loop arrays stay arrays [T]), with the
    token and answer counts."""
    sums: dict[str, np.ndarray] = {}
    weights = {"answer_accuracy_per_loop": "num_answers"}
    totals = {"num_tokens": 0.0, "num_answers": 0.0}
    for batch in batches:
        m = jax.device_get(eval_step(params, batch))
        for key in totals:
            totals[key] += float(m.get(key, 0.0))
        for key, value in m.items():
            if key in totals:
                continue
            w = float(m[weights.get(key, "num_tokens")])
            sums[key] = sums.get(key, 0.0) + w * np.asarray(value, np.float64)
    means = {k: v / max(totals[weights.get(k, "num_tokens")], 1.0) for k, v in sums.items()}
    return {**means, **totals}
