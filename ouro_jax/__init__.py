"""ouro_jax: Ouro (LoopLM) looped language models in JAX / Flax NNX.

Public API:
  OuroConfig, Ouro, OuroOutput, num_params   the model (ouro_jax.model)
  exits                                      exit distribution and exit policies
  objective                                  Stage I / Stage II losses and per-loop metrics
  from_pretrained, save_pretrained           Hugging Face / ouro_jax checkpoints in and out
  generate, left_pad                         KV-cached generation with adaptive exit (ouro_jax.inference)

Commands (`python -m ouro_jax.<package>`): train, inference (generation), convert (HF export/import),
data (tokenised shards), evaluate, experiments, aot, benchmarks, serve (OpenAI-compatible server).
"""

from ouro_jax import objective
from ouro_jax.convert.pretrained import from_pretrained, save_pretrained
from ouro_jax.inference import generate, left_pad
from ouro_jax.model import exits
from ouro_jax.model.config import PRESETS, OuroConfig
from ouro_jax.model.ouro import Ouro, OuroOutput, num_params

__all__ = ["PRESETS", "Ouro", "OuroConfig", "OuroOutput", "exits", "from_pretrained", "generate",
           "left_pad", "num_params", "objective", "save_pretrained"]
