"""Train state and the pure, jitted train / eval steps over (graphdef, params)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from ouro_jax import objective, sharding
from ouro_jax.model.ouro import Ouro
from ouro_jax.train import optimizer as optim

Batch = dict[str, jax.Array]


@struct.dataclass
class TrainState:
    """step int32 []; params pure dict; opt_state optax state; rng uint32 [2] (a raw PRNG key,
    advanced every step; reserved for stochastic components, checkpointed with the state)."""

    step: jax.Array
    params: dict
    opt_state: Any
    rng: jax.Array

    def checkpoint_items(self) -> tuple[dict, dict]:
        """(params, train) as `ouro_jax.run.Checkpointer` stores them (params alone for `init_from`)."""
        return self.params, {"step": self.step, "opt_state": self.opt_state, "rng": self.rng}

    @classmethod
    def from_checkpoint_items(cls, params: dict, train: dict) -> TrainState:
        return cls(step=train["step"], params=params, opt_state=train["opt_state"], rng=train["rng"])


def init_fn(model_factory: Callable[[], Ouro], tx: optax.GradientTransformation, seed: int,
            param_shardings) -> Callable[[], TrainState]:
    """A function (to jit) that builds the model's parameters directly in their shardings, and the
    optimiser state with every copy of the parameter tree in it (AdamW's moments) sharded the same way
    (left alone, XLA replicates the moments: they are `zeros_like`, no data flows from the params)."""

    def init() -> TrainState:
        params = nnx.to_pure_dict(nnx.state(model_factory(), nnx.Param))
        params = jax.lax.with_sharding_constraint(params, param_shardings)
        opt_state = tx.init(params)
        opt_state = jax.lax.with_sharding_constraint(
            opt_state, sharding.optimizer_state_shardings(opt_state, params, param_shardings))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                          rng=jax.random.PRNGKey(seed))

    return init


def _accumulate(loss_and_grad, params, batch: Batch, micro_steps: int):
    """Token-weighted mean of (metrics, grads) over `micro_steps` slices of the batch rows
    (rows m, m + A, m + 2A, ... form micro-batch m, so each stays spread over the data shards)."""
    if micro_steps == 1:
        (_, metrics), grads = loss_and_grad(params, batch)
        return metrics, grads
    micro = jax.tree.map(lambda x: x.reshape(-1, micro_steps, *x.shape[1:]).swapaxes(0, 1), batch)

    def weighted(mb):  # (sum over tokens of metrics and grads, token count)
        mb = jax.tree.map(lambda x: sharding.constrain(x, ("batch", None)), mb)
        (_, metrics), grads = loss_and_grad(params, mb)
        tokens = metrics["num_tokens"]
        return jax.tree.map(lambda x: tokens * x, (metrics, grads)), tokens

    def body(total, mb):
        return jax.tree.map(jnp.add, total, weighted(mb)), None

    # One loop over every micro-batch from a zero total: a first micro-batch computed before the loop
    # would be a second copy of the model's program, independent of the loop's, and XLA overlaps the
    # two when it inlines a one-trip loop (two sets of activations live at once; twice the compile).
    total = jax.eval_shape(weighted, jax.tree.map(lambda x: x[0], micro))
    total = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), total)
    ((metrics, grads), tokens), _ = jax.lax.scan(body, total, micro)
    metrics, grads = jax.tree.map(lambda x: x / jnp.maximum(tokens, 1.0), (metrics, grads))
    return {**metrics, "num_tokens": tokens}, grads


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    objective_cfg: Mapping[str, Any], trainable, micro_steps: int = 1, mesh=None):
    """`train_step(state, batch) -> (state, metrics)`: one optimiser update (with gradient
    accumulation over `micro_steps` micro-batches), frozen parameters left bit-identical. With a
    `mesh`, it is traced with that mesh current, so the model's activation constraints
    (`sharding.constrain`) apply."""

    def loss(params, batch):
        return objective.loss_fn(nnx.merge(graphdef, params), batch, objective_cfg)

    loss_and_grad = jax.value_and_grad(loss, has_aux=True)

    def train_step(state: TrainState, batch: Batch):
        metrics, grads = _accumulate(loss_and_grad, state.params, batch, micro_steps)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optim.apply_updates(state.params, updates, trainable)
        metrics = {**metrics, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
        rng, _ = jax.random.split(state.rng)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics

    return sharding.traced_on(mesh, train_step)


def make_eval_step(graphdef, num_loops: int | None = None, mesh=None):
    """`eval_step(params, batch) -> metrics` with per-loop CE / accuracy, exit statistics and, where
    the batch marks task answers (`answer_mask`), per-loop answer accuracy (traced on `mesh` as
    `make_train_step`)."""

    def eval_step(params, batch: Batch):
        model = nnx.merge(graphdef, params)
        ce, correct, gate_logits, _ = objective.per_loop_losses(model, batch, num_loops=num_loops)
        mask = batch["loss_mask"].astype(jnp.float32)
        metrics = objective.loop_metrics(ce, correct, gate_logits, mask)
        answers = batch.get("answer_mask")
        if answers is not None:
            answers = answers.astype(jnp.float32)
            metrics["answer_accuracy_per_loop"] = (
                jnp.sum(correct * answers, axis=(1, 2)) / jnp.maximum(jnp.sum(answers), 1.0))
            metrics["num_answers"] = jnp.sum(answers)
        return metrics

    return sharding.traced_on(mesh, eval_step)
