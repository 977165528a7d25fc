"""Stage II (ouro_spec.md §6.2): train only the exit gate of a trained model, LM frozen, against
loss-improvement targets (k = 50, gamma = 0.005).

  python -m ouro_jax.train --config=configs/gate_stage2.py:demo --workdir=runs/demo_gate \\
      --config.init_from=runs/demo
  python -m ouro_jax.train --config=configs/gate_stage2.py:ouro_1p4b --workdir=... \\
      --config.init_from=<imported HF checkpoint or run> --config.data.array_record.paths=...

The variant names the model the checkpoint holds: `demo` (configs/demo.py) or `ouro_1p4b` /
`ouro_2p6b` (released shapes, trained on text shards). Stage II data, steps and LR are not published;
these are our choices. `--config.objective.pairing=next` supervises each step's gate with the
improvement of the next step instead of the printed pairing. On the demo (1500 steps) the printed
pairing taught the gate to exit at step 1 for 67 % of tokens (where accuracy is 30 %); `next` gave a
usable gate (Q-exit q = 0.5: 99.5 % answer accuracy at 3.05 loops; README, "Measured").
"""

from configs import demo
from configs.ouro_1p4b import stage_config
from ouro_jax.model.config import ouro_1p4b, ouro_2p6b


def get_config(arg: str | None = None):
    model = arg or "demo"
    if model == "demo":
        c = demo.get_config("steps=300")
    elif model in ("ouro_1p4b", "ouro_2p6b"):
        c = stage_config("4", {"ouro_1p4b": ouro_1p4b, "ouro_2p6b": ouro_2p6b}[model]())
        c.total_steps = 2000
    else:
        raise ValueError(f"configs/gate_stage2.py: unknown model {model!r}; use demo, ouro_1p4b or ouro_2p6b")
    c.objective.stage = 2
    c.optimizer.update(learning_rate=1e-3, schedule="constant", warmup_steps=50, weight_decay=0.0)
    return c  # the trained model comes from --config.init_from=...
