"""The programs of a training run, built once from a validated config and a mesh.

`build` gives everything the trainer jits: the model's graphdef, the optimiser, the state initialiser
(compiled, so its output shardings and shapes are known before any parameter exists), and the jitted,
donated train step and eval step with their shardings. Training runs these; ahead-of-time compilation
for another topology lowers exactly the same functions with the same shardings.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from ouro_jax import sharding
from ouro_jax.model.ouro import Ouro
from ouro_jax.train import optimizer as optim
from ouro_jax.train.config import Resolved
from ouro_jax.train.step import TrainState, init_fn, make_eval_step, make_train_step


@dataclasses.dataclass(frozen=True)
class Program:
    """mesh; graphdef of the model; tx the optimiser; abstract_params (ShapeDtypeStructs); param_shardings,
    state_shardings (a TrainState of NamedShardings), batch_sharding; abstract_state (ShapeDtypeStructs
    with shardings); init () -> TrainState (compiled); train_step (state, batch) -> (state, metrics) and
    eval_step (params, batch) -> metrics, both jitted with explicit shardings (state donated)."""

    mesh: Mesh
    graphdef: Any
    tx: optax.GradientTransformation
    abstract_params: dict
    param_shardings: dict
    state_shardings: TrainState
    batch_sharding: NamedSharding
    abstract_state: TrainState
    init: Any
    train_step: Any
    eval_step: Any

    def state_from_params(self, params: dict, seed: int) -> TrainState:
        """A fresh TrainState (step 0, new optimiser state) around given, already placed parameters."""
        make = lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=self.tx.init(p),
                                    rng=jax.random.PRNGKey(seed))
        return jax.jit(make, out_shardings=self.state_shardings)(params)


def abstract_like(tree, shardings):
    """ShapeDtypeStructs of `tree` carrying `shardings` (restore targets on a mesh)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def build(config: ml_collections.ConfigDict, resolved: Resolved, mesh: Mesh) -> Program:
    """The run's programs on `mesh` (nothing is run; `init` is compiled, the steps are jitted)."""
    model_factory = lambda: Ouro(resolved.model, rngs=nnx.Rngs(config.seed))
    abstract_model = nnx.eval_shape(model_factory)
    graphdef, abstract_state = nnx.split(abstract_model)
    abstract_params = nnx.to_pure_dict(abstract_state)
    param_shardings = sharding.param_shardings(abstract_params, sharding.logical_axes(abstract_model), mesh)
    stage = resolved.objective["stage"]
    tx = optim.make_optimizer(resolved.optimizer, config.total_steps, abstract_params, stage)
    init = jax.jit(init_fn(model_factory, tx, config.seed, param_shardings)).lower().compile()
    state_shardings = init.output_shardings
    batch_sharding = sharding.batch_sharding(mesh)
    train_step = jax.jit(
        make_train_step(graphdef, tx, optim.learning_rate_schedule(resolved.optimizer, config.total_steps),
                        resolved.objective, optim.trainable_mask(abstract_params, stage),
                        resolved.micro_batches, mesh=mesh),
        in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, None),
        donate_argnums=0)
    eval_step = jax.jit(make_eval_step(graphdef, mesh=mesh),
                        in_shardings=(state_shardings.params, batch_sharding))
    return Program(mesh=mesh, graphdef=graphdef, tx=tx, abstract_params=abstract_params,
                   param_shardings=param_shardings, state_shardings=state_shardings,
                   batch_sharding=batch_sharding,
                   abstract_state=abstract_like(init.out_info, state_shardings),
                   init=init, train_step=train_step, eval_step=eval_step)
