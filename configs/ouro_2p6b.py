"""Ouro-2.6B: the 1.4B recipe with 48 layers, upcycled from a 24-layer stage-1a run by layer
duplication at the start of stage 1b (arXiv:2510.25741 §4.1):

  python -m ouro_jax.train --config=configs/ouro_2p6b.py:1b --workdir=... \\
      --config.init_from=<ouro_1p4b stage-1a run> --config.data.array_record.paths=...

The duplication order is not published; `init_upcycle="stacked"` (0..23, 0..23) makes one 48-layer
loop equal two 24-layer passes without the inter-loop norm (closest to stage 1a's T=8), and
`--config.init_upcycle=interleaved` (0,0,1,1,...) is the alternative. Later stages (`:2`, `:3`,
`:4`) continue from the previous 2.6B stage without upcycling; stage 1a is trained at 24 layers
with configs/ouro_1p4b.py:1a.
"""

from ouro_jax.train import recipes
from ouro_jax.train.config import parse_variant


def get_config(arg: str | None = None):
    options = parse_variant(arg, {"stage": "1b"}, where="configs/ouro_2p6b.py", positional="stage",
                            choices={"stage": tuple(s for s in recipes.STAGES if s != "1a")})
    return recipes.pretraining(options["stage"], "ouro_2p6b")
