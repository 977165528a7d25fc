"""`python -m ouro_jax.train --config=configs/NAME.py[:variant] --workdir=DIR [--config.key=value ...]`.

Several processes (hosts): start the same command once per host; `ouro_jax.distributed` detects SLURM,
Open MPI and TPU slices, or takes `--coordinator_address=HOST:PORT --num_processes=N --process_id=I`.
Only process 0 prints and writes metrics; every process saves its own checkpoint shards.

Exit status: 0 finished; 1 refused or failed (one line `error: ...`: bad config, workdir in use or
holding another run, non-finite loss); 75 (EX_TEMPFAIL) stopped by SIGTERM / SIGINT after saving a
checkpoint: rerun the same command to resume.
"""

import sys

from absl import flags
from ml_collections import config_flags

from ouro_jax import cli, distributed

PREEMPTED = 75
"""Exit status after a signal-triggered save: the run is incomplete and resumes when rerun."""

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/NAME.py[:variant]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, TensorBoard.")
_CONFIG_CHANGE = flags.DEFINE_enum(
    "config_change", "refuse", ["refuse", "allow"],
    "Resuming a run whose recorded config differs: refuse, or allow (and record the change in "
    "WORKDIR/config_changes.jsonl). A different model shape is always refused.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    distributed.initialize_from_flags()  # before anything touches a device
    import jax

    from ouro_jax.train import loop, metrics  # after flag parsing, so --help stays fast

    primary = jax.process_index() == 0
    try:
        loop.train(_CONFIG.value, _WORKDIR.value, allow_config_change=_CONFIG_CHANGE.value == "allow")
    except loop.TrainingDiverged as err:
        cli.fail(err)
    except loop.Interrupted as err:
        if primary:
            print(f"stopped: {err}", file=sys.stderr)
            print(metrics.summary(_WORKDIR.value))
        return PREEMPTED
    if primary:
        print(metrics.summary(_WORKDIR.value))


if __name__ == "__main__":
    cli.run(main)
