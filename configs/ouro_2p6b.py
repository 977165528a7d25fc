"""Ouro-2.6B: the 1.4B recipe with 48 layers, upcycled from a 24-layer stage-1a run by layer
duplication at the start of stage 1b (ouro_spec.md §7):

  python -m ouro_jax.train --config=configs/ouro_2p6b.py:1b --workdir=... \\
      --config.init_from=<ouro_1p4b stage-1a run> --config.data.array_record.paths=...

The duplication order is not published; `init_upcycle="stacked"` (0..23, 0..23) makes one 48-layer
step equal two 24-layer passes without the inter-step norm (closest to stage 1a's T=8), and
`--config.init_upcycle=interleaved` (0,0,1,1,...) is the alternative. Later stages (`:2`, `:3`,
`:4`) continue from the previous 2.6B stage without upcycling.
"""

from configs.ouro_1p4b import STAGES, stage_config
from ouro_jax.model.config import ouro_2p6b


def get_config(arg: str | None = None):
    stage = arg or "1b"
    if stage not in STAGES or stage == "1a":
        raise ValueError(f"configs/ouro_2p6b.py: stage must be one of 1b, 2, 3, 4 (got {stage!r}); "
                         "stage 1a is trained at 24 layers with configs/ouro_1p4b.py:1a")
    c = stage_config(stage, ouro_2p6b())
    c.init_upcycle = "stacked" if stage == "1b" else ""
    return c
