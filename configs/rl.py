"""On-policy RL with exit replay: `python -m ouro_jax.rl --config=configs/rl.py:VARIANT --workdir=DIR`.

Variants:
  demo   the depth as an action, from nothing (E2's setting, docs/rl.md): trains its own Stage I base in
         WORKDIR/base (`recipes.demo`, the 1-layer block looped 4 times, 1500 steps on p-hop with 1-3
         hops per example) unless `--config.init_from` names one, then 400 steps of RL with each token's
         exit drawn from the gate and a depth cost (reward - 0.02 x mean loops per token), learning rate
         2e-5, CISPO, G = 8 x 8 prompts; held-out on 1024 prompts. 6 min 26 s on 2 CPU cores.
  tiny   a fresh `tiny` Ouro on n-ary addition (3 two-digit terms, 3-digit answers), Q-exit q = 0.5 with
         skipped_kv "project", 2 x 4 rollouts: the smoke test's shape.
  e1     E1 (not run yet): addition from a Stage I addition run (`--config.init_from=RUN`), Q-exit, 300
         steps; the comparison is the same wall-clock of continued supervised training
         (`python -m ouro_jax.train --config=configs/demo.py` with data.source=addition and
         --config.init_from the same run).
"""

import ml_collections

from ouro_jax.model.config import tiny
from ouro_jax.train.config import base_config, model_dict, parse_variant


def _base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    train = base_config()
    for key in ("seed", "max_checkpoints_to_keep", "init_from"):
        c[key] = train[key]
    c.total_steps = 200
    c.base_steps = 0  # > 0: train a Stage I base in WORKDIR/base first when init_from is empty (p-hop)
    c.log_every_steps = 1
    c.checkpoint_every_steps = 50
    c.eval_every_steps = 50
    c.eval_prompts = 128
    c.model = model_dict(tiny(vocab_size=12))
    c.optimizer = train.optimizer
    c.optimizer.update(learning_rate=1e-4, warmup_steps=0, schedule="constant", weight_decay=0.0)
    c.data = ml_collections.ConfigDict(dict(source="addition", seq_len=12, addition=dict(terms=3, digits=2),
                                            phop=dict(p=3, alphabet=4, p_min=1)))
    c.rl = ml_collections.ConfigDict(dict(
        prompts_per_step=8, group_size=8, temperature=1.0,
        exit_policy="q_exit", exit_threshold=0.5, skipped_kv="project", kv_sharing="none",
        loss="cispo", eps_low=0.2, eps_high=0.2, cispo_max=5.0, std="none", aggregation="token_mean",
        credit="exit", kl_coef=0.0, depth_cost=0.0, reward="exact_match"))
    return c


def get_config(arg: str | None = None):
    values = parse_variant(arg, {"variant": "demo", "steps": 0}, where="configs/rl.py", positional="variant",
                           choices={"variant": ("demo", "tiny", "e1")})
    c = _base()
    if values["variant"] == "tiny":
        c.total_steps, c.eval_every_steps, c.checkpoint_every_steps, c.eval_prompts = 4, 2, 2, 16
        c.rl.update(prompts_per_step=2, group_size=4)
    elif values["variant"] == "e1":
        c.total_steps, c.eval_prompts = 300, 512
    else:  # demo
        c.base_steps = 1500
        c.data.source, c.data.seq_len = "phop", 32
        c.model = model_dict(tiny(vocab_size=7))  # used only with base_steps = 0 and no init_from
        c.total_steps, c.eval_every_steps, c.eval_prompts = 400, 100, 1024
        c.optimizer.learning_rate = 2e-5
        c.rl.update(exit_policy="sample", depth_cost=0.02)
    if values["steps"]:
        c.total_steps = values["steps"]
    return c
