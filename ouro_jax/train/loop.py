"""The training loop: `train(config, workdir)`.

Sections: set-up (validate, mesh, data, state) -> resume or init -> loop (step, log, eval,
checkpoint) -> final save. Rerunning the same command resumes from the latest complete checkpoint
and continues with the same data and the same results as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from ouro_jax import sharding
from ouro_jax.convert.upcycle import upcycle
from ouro_jax.data import pipeline
from ouro_jax.model.ouro import Ouro
from ouro_jax.train import config as config_lib
from ouro_jax.train import metrics as metrics_lib
from ouro_jax.train import optimizer as optim
from ouro_jax.train.checkpoint import Checkpointer, abstract_like, restore_params
from ouro_jax.train.step import TrainState, init_fn, make_eval_step, make_train_step


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class _Preemption:
    """Remembers a SIGTERM so the loop can save and stop at the next step boundary."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def check(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    path = os.path.join(workdir, "config.json")
    with open(path + ".tmp", "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(path + ".tmp", path)


def _initial_params(config, resolved, abstract_params, param_shardings):
    """Parameters from `config.init_from` (optionally upcycled), placed on the mesh."""
    source = abstract_params
    if config.init_upcycle:
        layers = resolved.model.num_hidden_layers
        if layers % 2:
            raise config_lib.ConfigError(
                f"config.init_upcycle: model.num_hidden_layers={layers} is not twice a source depth")
        source = {**abstract_params, "layers": jax.tree.map(
            lambda x: jax.ShapeDtypeStruct((layers // 2, *x.shape[1:]), x.dtype), abstract_params["layers"])}
    params = restore_params(config.init_from, source)
    if config.init_upcycle:
        params = upcycle(params, factor=2, order=config.init_upcycle)
    return jax.device_put(params, param_shardings)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train (or resume) the run in `workdir`; returns the last logged record."""
    # --- set-up: everything that can fail on user input fails here, before compiling ---------
    try:
        resolved = config_lib.validate(config)
        if resolved.objective["stage"] == 2 and not config.init_from:
            raise config_lib.ConfigError("config.init_from: Stage II trains the exit gate of a trained "
                                         "model; set --config.init_from=RUN_OR_CHECKPOINT")
        sharding.initialize_distributed()
        mesh = sharding.make_mesh(resolved.mesh)
        data_rows = mesh.shape["data"] * mesh.shape["fsdp"]
        micro = resolved.optimizer["grad_accum_steps"]
        if config.data.batch_size % (micro * data_rows):
            raise config_lib.ConfigError(
                f"config.data.batch_size: {config.data.batch_size} rows must split into "
                f"grad_accum_steps={micro} micro-batches over data x fsdp={data_rows} devices")
        data_iter = iter(pipeline.build_train_dataset(
            config.data, seed=config.seed, process_index=jax.process_index(),
            process_count=jax.process_count()))
        eval_batches = (pipeline.build_eval_batches(
            config.data, seed=config.seed, num_batches=config.data.eval_batches,
            process_index=jax.process_index(), process_count=jax.process_count())
            if config.eval_every_steps else [])
    except ValueError as err:  # data and mesh errors: one line naming the problem
        raise config_lib.ConfigError(str(err)) from err
    os.makedirs(workdir, exist_ok=True)

    # --- model, optimiser, sharded state ----------------------------------------------------------
    model_factory = lambda: Ouro(resolved.model, rngs=nnx.Rngs(config.seed))
    abstract_model = nnx.eval_shape(model_factory)
    graphdef, abstract_state = nnx.split(abstract_model)
    abstract_params = nnx.to_pure_dict(abstract_state)
    param_shardings = sharding.param_shardings(
        abstract_params, sharding.logical_axes(abstract_model), mesh)
    stage = resolved.objective["stage"]
    tx = optim.make_optimizer(resolved.optimizer, config.total_steps, abstract_params, stage)
    trainable = optim.trainable_mask(abstract_params, stage)
    init = jax.jit(init_fn(model_factory, tx, config.seed, param_shardings)).lower().compile()
    state_shardings = init.output_shardings
    abstract_train_state = abstract_like(init.out_info, state_shardings)

    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                                max_to_keep=config.max_checkpoints_to_keep or None,
                                async_save=config.async_checkpointing)
    resumed = checkpointer.latest_step()
    if resumed is not None:
        state = checkpointer.restore(resumed, abstract_train_state, data_iter)
        logging.info("resumed from step %d", resumed)
    elif config.init_from:
        params = _initial_params(config, resolved, abstract_params, param_shardings)
        state = jax.jit(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                                             rng=jax.random.PRNGKey(config.seed)),
                        out_shardings=state_shardings)(params)
    else:
        state = init()
    _write_config(config, workdir)
    is_primary = jax.process_index() == 0
    writer = metrics_lib.MetricsWriter(workdir, resumed_step=resumed, is_primary=is_primary)

    batch_sharding = sharding.batch_sharding(mesh)
    train_step = jax.jit(
        make_train_step(graphdef, tx, optim.learning_rate_schedule(resolved.optimizer, config.total_steps),
                        resolved.objective, trainable, micro),
        in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, None),
        donate_argnums=0)
    eval_step = jax.jit(make_eval_step(graphdef), in_shardings=(state_shardings.params, batch_sharding))
    eval_batches = [sharding.put_batch(b, batch_sharding) for b in eval_batches]

    # --- loop ---------------------------------------------------------------------------------
    preemption = _Preemption()
    step = int(state.step)
    progress = metrics_lib.Progress(config.total_steps, step)
    last_log_time, last_log_step = time.perf_counter(), step
    tokens_per_step = config.data.batch_size * config.data.seq_len
    record: dict = {}
    while step < config.total_steps:
        batch = sharding.put_batch(next(data_iter), batch_sharding)
        state, step_metrics = train_step(state, batch)
        step += 1
        loss = float(step_metrics["loss"])
        if not math.isfinite(loss):
            checkpointer.close()
            raise TrainingDiverged(
                f"loss is {loss} at step {step}; stopped, last good checkpoint: "
                f"{checkpointer.latest_step()} in {checkpointer.directory}")
        progress.update(step, loss)
        record = {}
        if step % config.log_every_steps == 0 or step == config.total_steps:
            now = time.perf_counter()
            record.update(metrics_lib.flatten(jax.device_get(step_metrics)))
            record["tokens_per_s"] = tokens_per_step * (step - last_log_step) / (now - last_log_time)
            last_log_time, last_log_step = now, step
            progress.update(step, loss, force=not progress.tty)
        if eval_batches and (step % config.eval_every_steps == 0 or step == config.total_steps):
            record.update(evaluate(eval_step, state.params, eval_batches))
        if record:
            writer.write(step, record)
        stop = preemption.check()
        if stop or step == config.total_steps or (
                config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0):
            checkpointer.save(state, data_iter)
        if stop:
            logging.warning("SIGTERM: saved step %d, stopping", step)
            break
    progress.close()
    checkpointer.close()
    writer.close()
    return record


def evaluate(eval_step, params, batches) -> dict[str, float]:
    """Token-weighted mean of eval metrics over `batches`, keys prefixed `eval_`."""
    sums: dict[str, np.ndarray] = {}
    weights = {"answer_accuracy_per_step": "num_answers"}
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
    return metrics_lib.flatten({**means, **totals}, prefix="eval_")


def summary(workdir: str) -> str:
    """A human-readable line about the last record of `workdir/metrics.jsonl`."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        last = json.loads(f.readlines()[-1])
    steps = sorted(int(k.rsplit("_", 1)[1]) for k in last if k.startswith("eval_answer_accuracy_step_"))
    key = "eval_answer_accuracy_step_" if steps else "eval_accuracy_step_"
    steps = steps or sorted(int(k.rsplit("_", 1)[1]) for k in last if k.startswith(key))
    per_step = "  ".join(f"step {t}: {100 * last[key + str(t)]:.1f}%" for t in steps)
    return f"step {last['step']}: loss {last['loss']:.4f}; {key.rstrip('_')} per loop step: {per_step}"
