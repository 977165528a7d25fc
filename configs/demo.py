"""The embedded default: a 1-layer Ouro looped 4 times learns 3-hop induction (p-hop, Saunshi et al.)
in a few minutes on 2 CPU cores; later loop steps answer better than earlier ones.

  python -m ouro_jax.train --config=configs/demo.py --workdir=runs/demo

Setting after ../shared/reference/phop_calibration.md (n=32, p=3, width 64, dense loss, lr 2e-3).
Variants: `:steps=N` shortens or lengthens the run (e.g. `configs/demo.py:steps=50` for a smoke run).
"""

from ouro_jax.model.config import OuroConfig
from ouro_jax.train.config import base_config, model_dict


def get_config(arg: str | None = None):
    options = dict(kv.split("=", 1) for kv in arg.split(",")) if arg else {}
    c = base_config()
    c.total_steps = int(options.get("steps", 1500))
    c.log_every_steps = 50
    c.eval_every_steps = 250
    c.checkpoint_every_steps = 500
    c.model = model_dict(OuroConfig(
        vocab_size=4, hidden_size=64, intermediate_size=176, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, head_dim=16, rope_theta=10_000.0,
        max_position_embeddings=32, total_ut_steps=4, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        scan_layers=False, remat_policy="full"))  # the fastest setting for this tiny model on CPU
    c.objective.beta = 0.1
    c.optimizer.update(learning_rate=2e-3, b2=0.98, warmup_steps=100, schedule="cosine", min_lr_ratio=0.1)
    c.data.update(source="phop", seq_len=32, batch_size=128, eval_batches=32)
    c.data.phop.update(p=3, alphabet=4)
    return c
