"""Training configuration: the keys every config has, and their validation.

Config files (`configs/*.py`) define `get_config(arg=None) -> ml_collections.ConfigDict`, start from
`base_config()` and change what they need; `--config.key=value` overrides any existing key, and
unknown keys are rejected by ml_collections (`lock_config=True`). `validate` turns the ConfigDict
into typed pieces at one boundary and raises `ConfigError` naming the key and the reason.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from ouro_jax.data import pipeline
from ouro_jax.model.config import OuroConfig, tiny
from ouro_jax.train.optimizer import SCHEDULES

UPCYCLE_ORDERS = ("", "stacked", "interleaved")


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key."""


def model_dict(config: OuroConfig) -> ml_collections.ConfigDict:
    """OuroConfig -> ConfigDict with every field, so each one can be overridden from the CLI."""
    return ml_collections.ConfigDict(dataclasses.asdict(config))


def base_config() -> ml_collections.ConfigDict:
    """Defaults shared by every training config."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 1000
    c.log_every_steps = 50
    c.checkpoint_every_steps = 500  # 0: only at the end (and on SIGTERM)
    c.eval_every_steps = 500  # 0: no periodic evaluation
    c.max_checkpoints_to_keep = 3
    c.async_checkpointing = True
    c.init_from = ""  # a run directory / checkpoint to take the parameters from
    c.init_upcycle = ""  # "stacked" or "interleaved": duplicate init_from's layers (24 -> 48)
    c.model = model_dict(tiny())
    c.objective = ml_collections.ConfigDict(
        dict(stage=1, beta=0.1, k=50.0, gamma=0.005, pairing="printed"))
    c.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=3e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0,
        schedule="wsd", warmup_steps=100, decay_steps=100, min_lr_ratio=0.1, grad_accum_steps=1))
    c.data = pipeline.default_config()  # keys documented in ouro_jax.data.pipeline
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    return c


@dataclasses.dataclass(frozen=True)
class Resolved:
    """The validated pieces the trainer uses."""

    model: OuroConfig
    objective: dict[str, Any]  # keyword arguments of objective.loss_fn for the chosen stage
    optimizer: dict[str, Any]
    mesh: dict[str, int]


def _check(condition: bool, key: str, why: str) -> None:
    if not condition:
        raise ConfigError(f"config.{key}: {why}")


def validate(c: ml_collections.ConfigDict) -> Resolved:
    """Check every key the trainer reads; the first bad one raises ConfigError."""
    for key in ("total_steps", "log_every_steps"):
        _check(c[key] >= 1, key, f"must be >= 1, got {c[key]}")
    for key in ("checkpoint_every_steps", "eval_every_steps", "max_checkpoints_to_keep"):
        _check(c[key] >= 0, key, f"must be >= 0, got {c[key]}")
    _check(c.init_upcycle in UPCYCLE_ORDERS, "init_upcycle", f"must be one of {UPCYCLE_ORDERS}")
    _check(not c.init_upcycle or bool(c.init_from), "init_upcycle", "needs config.init_from")
    try:
        model = OuroConfig(**c.model.to_dict())
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config.model: {err}") from None

    obj = c.objective
    _check(obj.stage in (1, 2), "objective.stage", f"must be 1 or 2, got {obj.stage}")
    if obj.stage == 1:
        _check(obj.beta >= 0, "objective.beta", f"must be >= 0, got {obj.beta}")
        objective = {"stage": 1, "beta": obj.beta}
    else:
        _check(obj.pairing in ("printed", "next"), "objective.pairing", "must be 'printed' or 'next'")
        _check(obj.k > 0, "objective.k", f"must be > 0, got {obj.k}")
        objective = {"stage": 2, "k": obj.k, "gamma": obj.gamma, "pairing": obj.pairing}

    opt = c.optimizer.to_dict()
    _check(opt["schedule"] in SCHEDULES, "optimizer.schedule", f"must be one of {SCHEDULES}")
    _check(opt["learning_rate"] > 0, "optimizer.learning_rate", "must be > 0")
    _check(opt["warmup_steps"] >= 0, "optimizer.warmup_steps", "must be >= 0")
    _check(opt["decay_steps"] >= 0, "optimizer.decay_steps", "must be >= 0")
    _check(0 <= opt["min_lr_ratio"] <= 1, "optimizer.min_lr_ratio", "must lie in [0, 1]")
    _check(opt["clip_norm"] > 0, "optimizer.clip_norm", "must be > 0")
    _check(0 <= opt["b1"] < 1 and 0 <= opt["b2"] < 1, "optimizer.b1/b2", "must lie in [0, 1)")
    _check(opt["grad_accum_steps"] >= 1, "optimizer.grad_accum_steps", "must be >= 1")
    _check(c.data.batch_size % opt["grad_accum_steps"] == 0, "data.batch_size",
           f"{c.data.batch_size} is not divisible by optimizer.grad_accum_steps="
           f"{opt['grad_accum_steps']}")
    _check(c.data.seq_len >= 2, "data.seq_len", "must be >= 2")
    return Resolved(model=model, objective=objective, optimizer=opt, mesh=c.mesh.to_dict())
