"""On-policy RL with exit replay: `python -m ouro_jax.rl --config=configs/rl.py:VARIANT --workdir=DIR`.

Variants:
  demo   n-ary addition (3 two-digit terms, 3-digit answers) from `--config.init_from=RUN` (a Stage I
         run on the same task; without it a fresh random model, which earns no reward), Q-exit q = 0.5
         with skipped_kv "project", CISPO, G = 8 x 8 prompts.
  tiny   a fresh `tiny` Ouro on the same task, 2 x 4 rollouts: the smoke test's shape.
  e1     E1 (not run yet): `demo`'s RL from a Stage I addition run, 300 steps; the comparison is the same
         wall-clock of continued supervised training (`python -m ouro_jax.train --config=configs/demo.py`
         with data.source=addition and --config.init_from the same run).
  e2     E2: mixed 1-3-hop p-hop from a Stage I run (`--config.init_from=RUN`, docs/rl.md), sampled exits
         with a depth cost (reward - 0.02 x mean loops per token): the gate learns when to stop; 400
         steps at learning rate 2e-5, held-out on 1024 prompts.
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
                           choices={"variant": ("demo", "tiny", "e1", "e2")})
    c = _base()
    if values["variant"] == "tiny":
        c.total_steps, c.eval_every_steps, c.checkpoint_every_steps, c.eval_prompts = 4, 2, 2, 16
        c.rl.update(prompts_per_step=2, group_size=4)
    elif values["variant"] == "e1":
        c.total_steps, c.eval_prompts = 300, 512
    elif values["variant"] == "e2":
        c.data.source, c.data.seq_len = "phop", 32
        c.model = model_dict(tiny(vocab_size=7))
        c.total_steps, c.eval_every_steps, c.eval_prompts = 400, 100, 1024
        c.optimizer.learning_rate = 2e-5
        c.rl.update(exit_policy="sample", depth_cost=0.02)
    if values["steps"]:
        c.total_steps = values["steps"]
    return c
