"""Chat supervised fine-tuning: ChatML conversations, loss on the assistant turns (docs/sft.md).

  python -m ouro_jax.train --config=configs/sft.py:cpu --workdir=runs/sft_cpu     # no files needed
  python -m ouro_jax.train --config=configs/sft.py:ouro_1p4b --workdir=runs/sft \\
      --config.init_from=Ouro-1.4B --config.data.chat.files=/data/chat/*.jsonl   # an HF directory or a run

Variants: `model` (positional) = cpu (default: a byte-level model on a generated arithmetic conversation
set), ouro_1p4b or ouro_2p6b (32K context, Adam lr 2e-5 (0.9, 0.95), cosine); `weighting` = exit_pdf
(Stage I, default), logit_mixture (the released code's `labels` loss) or last_loop, e.g.
`configs/sft.py:cpu,weighting=logit_mixture`. Conversation formats and masks: `ouro_jax.data.chat`.
"""

from ouro_jax.objective import WEIGHTINGS
from ouro_jax.train import recipes
from ouro_jax.train.config import parse_variant


def get_config(arg: str | None = None):
    options = parse_variant(arg, {"model": "cpu", "weighting": recipes.SFT_WEIGHTING},
                            where="configs/sft.py", positional="model",
                            choices={"model": recipes.SFT_MODELS, "weighting": WEIGHTINGS})
    return recipes.sft(**options)
