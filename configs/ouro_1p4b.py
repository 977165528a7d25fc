"""Ouro-1.4B pre-training recipe (ouro_spec.md §7, paper Table 1), one variant per stage:

  python -m ouro_jax.train --config=configs/ouro_1p4b.py:1a --workdir=gs://bucket/ouro/1a \\
      --config.data.array_record.paths=gs://bucket/tokens/stage1/*.array_record
  python -m ouro_jax.train --config=configs/ouro_1p4b.py:1b --workdir=... --config.init_from=<1a run>

| variant | tokens | seq  | LR schedule                    | T | beta | RoPE base |
| 1a      | 3T     | 4K   | warmup + constant 3e-4         | 8 | 0.1  | 10K       |
| 1b      | 3T     | 4K   | constant 3e-4                  | 4 | 0.05 | 10K       |
| 2       | 1.4T   | 16K  | cosine 3e-4 -> 3e-5            | 4 | 0.05 | 40K       |
| 3       | 20B    | 64K  | constant 3e-5                  | 4 | 0.05 | 1M        |
| 4       | 300B   | 32K  | cosine 3e-5 -> 1e-5            | 4 | 0.05 | 1M        |
Batch 8M tokens (4M during 1a's first part); AdamW (0.9, 0.95), weight decay 0.1, clip 1.0. Stages
after 1a start from the previous stage's parameters (`init_from`; the optimiser state restarts). The
warmup length and AdamW epsilon are not published; 2000 steps and 1e-8 are our choices.
Data: tokenised ArrayRecord shards from `python -m ouro_jax.data.prepare --tokenizer=ouro`.
"""

from ouro_jax.model.config import ouro_1p4b
from ouro_jax.train.config import base_config, model_dict

# stage: (tokens, seq_len, tokens per batch, schedule, peak lr, final lr, T, beta, rope_theta)
STAGES = {
    "1a": (3e12, 4096, 4 * 2**20, "constant", 3e-4, 3e-4, 8, 0.1, 10_000.0),
    "1b": (3e12, 4096, 8 * 2**20, "constant", 3e-4, 3e-4, 4, 0.05, 10_000.0),
    "2": (1.4e12, 16384, 8 * 2**20, "cosine", 3e-4, 3e-5, 4, 0.05, 40_000.0),
    "3": (2e10, 65536, 8 * 2**20, "constant", 3e-5, 3e-5, 4, 0.05, 1_000_000.0),
    "4": (3e11, 32768, 8 * 2**20, "cosine", 3e-5, 1e-5, 4, 0.05, 1_000_000.0),
}


def stage_config(stage: str, model):
    tokens, seq_len, batch_tokens, schedule, peak, final, steps, beta, theta = STAGES[stage]
    c = base_config()
    rows = batch_tokens // seq_len
    c.total_steps = int(tokens // batch_tokens)
    c.log_every_steps = 10
    c.eval_every_steps = 1000
    c.checkpoint_every_steps = 1000
    c.model = model_dict(model.replace(total_ut_steps=steps, rope_theta=theta, dtype="bfloat16",
                                       param_dtype="float32", remat_policy="save_qkv_context"))
    c.objective.beta = beta
    c.optimizer.update(learning_rate=peak, schedule=schedule, min_lr_ratio=final / peak,
                       warmup_steps=2000 if stage == "1a" else 0, b1=0.9, b2=0.95, weight_decay=0.1,
                       clip_norm=1.0)
    c.data.update(source="array_record", seq_len=seq_len, batch_size=rows, num_workers=8,
                  eval_batches=16, tokenizer="ouro")
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    return c


def get_config(arg: str | None = None):
    stage = arg or "1b"
    if stage not in STAGES:
        raise ValueError(f"configs/ouro_1p4b.py: unknown stage {stage!r}; choose one of {sorted(STAGES)}")
    return stage_config(stage, ouro_1p4b())
