"""Inference for Ouro: KV-cached batched generation with per-token adaptive depth and KV sharing.

  generate(model, input_ids, max_new_tokens, ...) -> GenerateOutput   (ouro_jax.inference.decode)
  left_pad(rows, pad_id) -> (input_ids, prompt_lengths)
  KVCache, SHARING                                                     (ouro_jax.inference.cache)
  ExitPolicy                                                           (ouro_jax.inference.policies)
CLI: `python -m ouro_jax.inference`; benchmark: `python -m ouro_jax.benchmarks --bench=decode`.
"""

from ouro_jax.inference.cache import SHARING, KVCache
from ouro_jax.inference.decode import GenerateOutput, GenerateStats, generate, left_pad
from ouro_jax.inference.policies import ExitPolicy

__all__ = ["SHARING", "ExitPolicy", "GenerateOutput", "GenerateStats", "KVCache", "generate", "left_pad"]
