"""`python -m ouro_jax.aot --config=configs/NAME.py[:variant] --topology=v5p-128 [--rows_per_chip=R|--search]`

Compiles, on this CPU host, the exact train step a run of CONFIG executes (`ouro_jax.train.program`: the
same jitted, donated function, shardings and gradient accumulation) for a Cloud TPU slice, with XLA's
TPU compiler from the libtpu wheel (`pip install -e '.[aot]'`), and prints per-chip memory, whether it
fits in HBM, analytic FLOPs and the step-time lower bound at the chip's peak bf16 FLOP/s.

  --rows_per_chip=R  micro-batch rows per chip; grad_accum_steps = data.batch_size / (R x chips)
  --search           the largest R that fits (and the grad_accum_steps the config's batch then needs)
  --num_slices=S     S slices joined by the data-centre network (the mesh's `data` axis spans them)
  --program=serve    generate's prefill and decode loop at --serve_batch rows and --serve_context tokens
  --json=FILE        also write the report(s) as JSON

`--config.key=value` overrides any config key (e.g. `--config.model.remat_policy=full`).
"""

import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before jax loads: compile-only TPU devices, no accelerator

from absl import flags
from ml_collections import config_flags

from ouro_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/NAME.py[:variant]).", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "Cloud TPU slice, e.g. v4-64, v5p-128, v5e-256, v6e-256.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Number of slices (multi-slice over DCN).", lower_bound=1)
_ROWS = flags.DEFINE_integer("rows_per_chip", None, "Micro-batch rows per chip (sets grad_accum_steps).",
                             lower_bound=1)
_SEARCH = flags.DEFINE_bool("search", False, "Find the largest rows per chip that fits.")
_PROGRAM = flags.DEFINE_enum("program", "train", ["train", "serve"], "The train step or generation.")
_SERVE_BATCH = flags.DEFINE_integer("serve_batch", 8, "--program=serve: rows.", lower_bound=1)
_SERVE_CONTEXT = flags.DEFINE_integer("serve_context", 4096, "--program=serve: prompt tokens.", lower_bound=1)
_JSON = flags.DEFINE_string("json", None, "Write the report(s) here as JSON.")
flags.mark_flags_as_required(["config", "topology"])


def main(argv):
    del argv
    from ouro_jax.aot import compile as aot
    from ouro_jax.aot import report, topology

    tpu = topology.parse(_TOPOLOGY.value)
    config, slices = _CONFIG.value, _NUM_SLICES.value
    if _PROGRAM.value == "serve":
        reports = aot.serving(config, tpu, batch=_SERVE_BATCH.value, context=_SERVE_CONTEXT.value,
                              num_slices=slices)
        print("\n\n".join(report.table(r) for r in reports))
    elif _SEARCH.value:
        if _ROWS.value is not None:
            raise cli.UserError("--search finds --rows_per_chip; give one or the other")
        best, reports = aot.search(config, tpu, num_slices=slices,
                                   log=lambda r: print(report.summary_row(r), flush=True))
        print()
        print(report.table(best) if best else f"even 1 row per chip does not fit on {tpu.name}")
    else:
        reports = [aot.train_step(config, tpu, num_slices=slices, rows_per_chip=_ROWS.value)]
        print(report.table(reports[0]))
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(reports if len(reports) > 1 else reports[0], f, indent=1)


if __name__ == "__main__":
    cli.run(main)
