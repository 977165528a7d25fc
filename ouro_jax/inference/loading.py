"""Load a model for inference from an ouro_jax run directory or a Hugging Face Ouro directory."""

from __future__ import annotations

import json
import os

from flax import nnx

from ouro_jax.model.config import OuroConfig
from ouro_jax.model.ouro import Ouro


def is_run_dir(path: str) -> bool:
    """An ouro_jax run: config.json with a "model" section next to checkpoints/."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "model" in config and os.path.isdir(os.path.join(path, "checkpoints"))


def load_run(path: str, dtype: str | None = None) -> tuple[Ouro, dict]:
    """(model, config.json dict) from a run's latest checkpoint; `dtype` overrides the compute dtype."""
    from ouro_jax.train.checkpoint import restore_params

    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    model_config = OuroConfig(**config["model"])
    if dtype is not None:
        model_config = model_config.replace(dtype=dtype)
    abstract = nnx.eval_shape(lambda: Ouro(model_config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, restore_params(path, nnx.to_pure_dict(state)))
    return nnx.merge(graphdef, state), config


def load_model(path: str, dtype: str | None = None) -> Ouro:
    """A run directory (`load_run`) or, through `ouro_jax.convert.pretrained.from_pretrained`, a
    Hugging Face Ouro directory.

    Raises:
      FileNotFoundError: `path` is not a directory.
      ValueError: neither kind of model directory, or the HF importer is not available.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model path {path} is not a directory")
    if is_run_dir(path):
        return load_run(path, dtype)[0]
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{path} has no config.json: expected an ouro_jax run or a Hugging Face Ouro directory")
    try:
        from ouro_jax.convert.pretrained import from_pretrained
    except ImportError as err:
        raise ValueError(f"{path} looks like a Hugging Face directory, but ouro_jax.convert.pretrained is "
                         f"not available ({err})") from err
    return from_pretrained(path, **({} if dtype is None else {"dtype": dtype}))
