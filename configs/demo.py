"""The embedded default: a 1-layer Ouro looped 4 times learns 3-hop induction (p-hop, Saunshi et al.)
in a few minutes on 2 CPU cores; later loops answer better than earlier ones.

  python -m ouro_jax.train --config=configs/demo.py --workdir=runs/demo

Variant: `:steps=N` (default 1500), e.g. `configs/demo.py:steps=50` for a smoke run.
"""

from ouro_jax.train import recipes
from ouro_jax.train.config import parse_variant


def get_config(arg: str | None = None):
    return recipes.demo(**parse_variant(arg, {"steps": 1500}, where="configs/demo.py"))
