"""Orbax checkpoints of a run: `WORKDIR/checkpoints/<step>/{params, train, data_iter}`.

`params` (the model) is a separate item so that other runs can start from it alone (`init_from`);
`train` holds step, optimiser state and RNG; `data_iter` the grain iterator state (one JSON file per
process). Orbax writes each step into a temporary directory and renames it when complete, so a crash
mid-save never leaves a checkpoint that `latest_step` would pick up.
"""

from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp

from ouro_jax.train.step import TrainState


class Checkpointer:
    """CheckpointManager over the three items, async by default."""

    def __init__(self, directory: str, *, max_to_keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=("params", "train", "data_iter"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True,
                cleanup_tmp_directories=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, data_iter) -> None:
        """Start saving `state` (and the iterator position, captured now) at `state.step`."""
        train = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}
        self.manager.save(int(state.step), force=True, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            train=ocp.args.StandardSave(train),
            data_iter=grain.checkpoint.CheckpointSave(data_iter)))

    def restore(self, step: int, abstract_state: TrainState, data_iter) -> TrainState:
        """Restore into `abstract_state`'s shapes and shardings (any mesh); sets `data_iter`."""
        train = {"step": abstract_state.step, "opt_state": abstract_state.opt_state,
                 "rng": abstract_state.rng}
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state.params),
            train=ocp.args.StandardRestore(train),
            data_iter=grain.checkpoint.CheckpointRestore(data_iter)))
        t = restored["train"]
        return TrainState(step=t["step"], params=restored["params"], opt_state=t["opt_state"],
                          rng=t["rng"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(path: str, abstract_params) -> dict:
    """Parameters of another run or imported checkpoint, in `abstract_params`' shapes/shardings.

    `path` is a run directory (its latest checkpoint), a `checkpoints/` directory, or one step
    directory. Layer counts must match `abstract_params` (upcycle before restoring otherwise).
    """
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "params")):  # a step directory
        step_dir = path
    else:
        directory = os.path.join(path, "checkpoints") if os.path.isdir(
            os.path.join(path, "checkpoints")) else path
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"init_from: no checkpoint directory at {path}")
        manager = ocp.CheckpointManager(directory, item_names=("params",),
                                        options=ocp.CheckpointManagerOptions(read_only=True))
        step = manager.latest_step()
        manager.close()
        if step is None:
            raise FileNotFoundError(f"init_from: no complete checkpoint under {directory}")
        step_dir = os.path.join(directory, str(step))
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(os.path.join(step_dir, "params"), abstract_params)


def abstract_like(tree, shardings):
    """ShapeDtypeStructs carrying `shardings` (for restoring onto a mesh)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
