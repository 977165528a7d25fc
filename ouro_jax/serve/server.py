"""Build the server from a checkpoint: model, tokenizer, backend, runner and app."""

from __future__ import annotations

import os

from ouro_jax import run
from ouro_jax import tokenizer as tok
from ouro_jax.convert.pretrained import from_pretrained
from ouro_jax.inference.engine import Engine
from ouro_jax.serve.app import create_app
from ouro_jax.serve.backend import StaticBatchBackend
from ouro_jax.serve.runner import Runner

BACKENDS = {"engine": Engine, "static": StaticBatchBackend}
"""Backend name -> class taking (model, *, max_slots, max_context, eos_token_ids, tokenizer, skipped_kv,
kv_sharing, exit_threshold): the continuous-batching engine (default) and static `generate` batches."""


def tokenizer_for(model_path: str, tokenizer: str | None = None):
    """`tokenizer` ("ouro", "bytes" or a tokenizer.json), else the model's own (`run.tokenizer_of`), else
    the bundled Ouro tokenizer."""
    return tok.load(tokenizer or run.tokenizer_of(model_path) or "ouro")


def build(model_path: str, *, backend: str = "engine", tokenizer: str | None = None, max_slots: int = 8,
          max_context: int | None = None, exit_threshold: float | None = None, skipped_kv: str = "project",
          kv_sharing: str = "none", api_key: str | None = None, model_name: str | None = None,
          dtype: str = "float32"):
    """(FastAPI app, Runner) serving the checkpoint at `model_path` (`ouro_jax.from_pretrained`) under
    `model_name` (default: the path's last component); max_context defaults to the model's
    max_position_embeddings. ValueError / OSError for bad settings, before anything compiles."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} must be one of {tuple(BACKENDS)}")
    model = from_pretrained(model_path, dtype=dtype)
    text = tokenizer_for(model_path, tokenizer)
    if text.get_vocab_size() > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {text.get_vocab_size()} tokens, more than the model's "
                         f"vocab_size {model.config.vocab_size}")
    eos = [i for i in tok.STOP_IDS if i < model.config.vocab_size]
    engine = BACKENDS[backend](
        model, max_slots=max_slots, max_context=max_context or model.config.max_position_embeddings,
        eos_token_ids=eos, tokenizer=text, skipped_kv=skipped_kv, kv_sharing=kv_sharing,
        exit_threshold=exit_threshold)
    runner = Runner(engine)
    name = model_name or os.path.basename(os.path.normpath(model_path))
    return create_app(runner, model, text, model_name=name, eos_token_ids=eos, api_key=api_key), runner
