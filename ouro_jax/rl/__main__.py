"""`python -m ouro_jax.rl --config=configs/rl.py[:variant] --workdir=DIR [--config.key=value ...]`.

On-policy RL with exit replay (`ouro_jax.rl.trainer`). Exit status as `python -m ouro_jax.train`: 0
finished; 1 refused or failed (one line `error: ...`: bad config, workdir in use or holding another run,
non-finite loss); 75 stopped by SIGTERM / SIGINT after saving a checkpoint: rerun the same command to
resume. Prints the summary (`WORKDIR/summary.json`: base and final held-out accuracy and mean loops).
"""

import json
import os
import sys

from absl import flags
from ml_collections import config_flags

from ouro_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "RL config file (configs/rl.py[:variant]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, TensorBoard, summary.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from ouro_jax.rl import trainer  # after flag parsing, so --help stays fast

    try:
        trainer.train(_CONFIG.value, _WORKDIR.value)
    except trainer.TrainingDiverged as err:
        cli.fail(err)
    except trainer.Interrupted as err:
        print(f"stopped: {err}", file=sys.stderr)
        return os.EX_TEMPFAIL  # 75, as python -m ouro_jax.train
    with open(os.path.join(_WORKDIR.value, "summary.json")) as f:
        print(json.dumps(json.load(f)))


if __name__ == "__main__":
    cli.run(main)
