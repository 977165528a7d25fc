"""Ouro-1.4B pre-training recipe (arXiv:2510.25741 §4.1, Table 1), one variant per stage:

  python -m ouro_jax.train --config=configs/ouro_1p4b.py:1a --workdir=/mnt/shared/ouro/1a \\
      --config.data.array_record.paths=/mnt/shared/tokens/stage1/*.array_record
  python -m ouro_jax.train --config=configs/ouro_1p4b.py:1b --workdir=... --config.init_from=<1a run>

| variant | tokens | seq  | LR schedule                    | T | beta | RoPE base |
| 1a      | 3T     | 4K   | warmup + constant 3e-4         | 8 | 0.1  | 10K       |
| 1b      | 3T     | 4K   | constant 3e-4                  | 4 | 0.05 | 10K       |
| 2       | 1.4T   | 16K  | cosine 3e-4 -> 3e-5            | 4 | 0.05 | 40K       |
| 3       | 20B    | 64K  | constant 3e-5                  | 4 | 0.05 | 1M        |
| 4       | 300B   | 32K  | cosine 3e-5 -> 1e-5            | 4 | 0.05 | 1M        |
Details and our choices for unpublished values: `ouro_jax.train.recipes.pretraining`.
Data: tokenised ArrayRecord shards from `python -m ouro_jax.data --tokenizer=ouro ...`. Stage 4 mixes
ChatML SFT conversations with Stage 1 and Stage 2 replay by tokens (90B : 30B : 180B, §4.1):

  python -m ouro_jax.train --config=configs/ouro_1p4b.py:4 --workdir=... --config.init_from=<3 run> \\
      --config.data.mixture.sft.chat.files=/mnt/shared/sft/*.jsonl \\
      --config.data.mixture.stage1.array_record.paths=/mnt/shared/tokens/stage1 \\
      --config.data.mixture.stage2.array_record.paths=/mnt/shared/tokens/stage2
"""

from ouro_jax.train import recipes
from ouro_jax.train.config import parse_variant


def get_config(arg: str | None = None):
    options = parse_variant(arg, {"stage": "1b"}, where="configs/ouro_1p4b.py", positional="stage",
                            choices={"stage": tuple(recipes.STAGES)})
    return recipes.pretraining(options["stage"], "ouro_1p4b")
