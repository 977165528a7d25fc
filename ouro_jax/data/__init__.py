"""Training data: synthetic tasks, Grain streams of packed batches, ArrayRecord preparation.

Public API:
  build_train_dataset, build_eval_batches, default_config, kjv_path, BATCH_KEYS   (pipeline)
  TASKS, PHop                                                                     (tasks)
  chat conversations (.jsonl, ChatML, assistant-token masks)                      (chat)
  weighted mixtures of sources, tokens per source                                 (mixture)
  python -m ouro_jax.data                                                         (ArrayRecord shards)
"""

from ouro_jax.data.pipeline import (
    BATCH_KEYS,
    build_eval_batches,
    build_train_dataset,
    default_config,
    kjv_path,
)
from ouro_jax.data.tasks import TASKS, PHop

__all__ = ["BATCH_KEYS", "TASKS", "PHop", "build_eval_batches", "build_train_dataset", "default_config",
           "kjv_path"]
