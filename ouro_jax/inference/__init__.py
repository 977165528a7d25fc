"""Inference for Ouro: KV-cached batched generation with per-token adaptive depth and KV sharing.

  generate(model, input_ids, max_new_tokens, ...) -> GenerateOutput   (ouro_jax.inference.decode)
  left_pad(rows, pad_id) -> (input_ids, prompt_lengths)
  programs(model, max_new_tokens, ...) -> Programs: generate's lowered programs (ahead-of-time compile)
  Engine(model, max_slots=, max_context=, ...): continuous batching; SamplingParams, TokenEvent
                                                                       (ouro_jax.inference.engine)
  KVCache, SHARING                                                     (ouro_jax.inference.cache)
  ExitPolicy                                                           (ouro_jax.inference.policies)
CLI: `python -m ouro_jax.inference`; benchmark: `python -m ouro_jax.benchmarks --bench=decode`.
"""

from ouro_jax.inference.cache import SHARING, KVCache
from ouro_jax.inference.decode import GenerateOutput, GenerateStats, Programs, generate, left_pad, programs
from ouro_jax.inference.engine import Engine, SamplingParams, TokenEvent
from ouro_jax.inference.policies import ExitPolicy

__all__ = ["SHARING", "Engine", "ExitPolicy", "GenerateOutput", "GenerateStats", "KVCache", "Programs",
           "SamplingParams", "TokenEvent", "generate", "left_pad", "programs"]
