"""Stage II (arXiv:2510.25741 §3.4): train only the exit gate of a trained model, LM frozen, against
loss-improvement targets (k = 50, gamma = 0.005).

  python -m ouro_jax.train --config=configs/gate_stage2.py:demo --workdir=runs/demo_gate \\
      --config.init_from=runs/demo
  python -m ouro_jax.train --config=configs/gate_stage2.py:ouro_1p4b --workdir=... \\
      --config.init_from=<imported HF checkpoint or run> --config.data.array_record.paths=...

The variant names the model the checkpoint holds: `demo` (configs/demo.py) or `ouro_1p4b` /
`ouro_2p6b` (released shapes, trained on text shards). Each loop's gate is supervised with the next
loop's loss improvement (`objective.pairing=next`); `--config.objective.pairing=printed` gives the
pairing as the paper prints it. Measured on p-hop: with the printed pairing the demo's gate exited after
loop 1 for 67 % of tokens (where accuracy is 30 %), while `next` gave 99.5 % answer accuracy at 3.05 loops
(q = 0.5); on mixed 1-3-hop p-hop `next` beat the Stage I gate by up to 3.5 points at equal depth and
`printed` did not (docs/experiments.md).
"""

from ouro_jax.train import recipes
from ouro_jax.train.config import parse_variant


def get_config(arg: str | None = None):
    options = parse_variant(arg, {"model": "demo"}, where="configs/gate_stage2.py", positional="model",
                            choices={"model": ("demo", *recipes.MODELS)})
    return recipes.gate_stage2(options["model"])
