"""ouro_jax: Ouro (LoopLM) looped language models in JAX / Flax NNX.

Public API:
  OuroConfig, Ouro, OuroOutput           the model (ouro_jax.model)
  exits                                   exit distribution and policies (ouro_jax.model.exits)
  objective                               Stage I / Stage II losses and per-step metrics
"""

from ouro_jax import objective
from ouro_jax.model import exits
from ouro_jax.model.config import PRESETS, OuroConfig
from ouro_jax.model.ouro import Ouro, OuroOutput, num_params

__all__ = ["PRESETS", "Ouro", "OuroConfig", "OuroOutput", "exits", "num_params", "objective"]
