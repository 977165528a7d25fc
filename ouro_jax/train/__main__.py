"""`python -m ouro_jax.train --config=configs/NAME.py[:variant] --workdir=DIR [--config.key=value ...]`."""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/NAME.py[:variant]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, TensorBoard.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax and grain log every save at INFO
    from ouro_jax.train import config as config_lib
    from ouro_jax.train import loop  # after flag parsing, so --help stays fast

    try:
        loop.train(_CONFIG.value, _WORKDIR.value)
    except (config_lib.ConfigError, FileNotFoundError, loop.TrainingDiverged) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    print(loop.summary(_WORKDIR.value))


if __name__ == "__main__":
    app.run(main)
