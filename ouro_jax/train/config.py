"""Training configuration: the keys every config has, variant parsing, and ALL validation.

Config files (`configs/*.py`) define `get_config(arg=None) -> ml_collections.ConfigDict`; they parse their
variant with `parse_variant` and build the config with `ouro_jax.train.recipes`. `--config.key=value`
overrides any existing key; unknown keys are rejected (`lock_config=True`). `validate` is the one place
that checks a config (model, objective, optimiser, data inputs, mesh against the devices, batch
divisibility, what Stage II needs) before anything compiles; it raises `ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections

from ouro_jax import run, sharding
from ouro_jax.cli import UserError
from ouro_jax.convert.pretrained import check_source
from ouro_jax.data import pipeline
from ouro_jax.model.config import OuroConfig, tiny
from ouro_jax.objective import WEIGHTINGS
from ouro_jax.train.optimizer import SCHEDULES

UPCYCLE_ORDERS = ("", "stacked", "interleaved")


class ConfigError(UserError):
    """A configuration value that cannot be used; the message names the key."""


def parse_variant(arg: str | None, defaults: Mapping[str, Any], *, where: str,
                  positional: str | None = None, choices: Mapping[str, tuple] | None = None) -> dict:
    """The `:variant` of `--config=FILE:variant` as typed values over `defaults`.

    `arg` is "key=value,key=value" (values converted to the type of the default); with `positional`, a
    bare value sets that key (`ouro_1p4b.py:1a`). Unknown keys (with the closest valid one), values that
    do not convert and values outside `choices` raise ConfigError naming `where` and the key.
    """
    values, choices = dict(defaults), choices or {}
    for item in (arg or "").split(","):
        if not item:
            continue
        key, sep, text = item.partition("=")
        if not sep:
            if positional is None:
                raise ConfigError(f"{where}: variant {item!r} is not key=value (keys: {', '.join(defaults)})")
            key, text = positional, item
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (keys: {', '.join(defaults)})"
            raise ConfigError(f"{where}: unknown variant key {key!r}{hint}")
        kind = type(defaults[key])
        try:
            value = (text.lower() in ("1", "true", "yes")) if kind is bool else kind(text)
        except ValueError:
            what = {int: "an integer", float: "a number"}.get(kind, kind.__name__)
            raise ConfigError(f"{where}: variant {key}={text!r} is not {what}") from None
        if key in choices and value not in choices[key]:
            allowed = ", ".join(map(str, choices[key]))
            raise ConfigError(f"{where}: variant {key}={text!r} must be one of {allowed}")
        values[key] = value
    return values


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
    c.init_from = ""  # parameters to start from: a run, one of its checkpoint steps, or an HF Ouro directory
    c.init_upcycle = ""  # "stacked" or "interleaved": duplicate init_from's layers (24 -> 48)
    c.model = model_dict(tiny())
    c.objective = ml_collections.ConfigDict(
        dict(stage=1, beta=0.1, weighting="exit_pdf", k=50.0, gamma=0.005, pairing="printed"))
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
    mesh: dict[str, int]  # the requested mesh, every axis resolved against the devices
    micro_batches: int  # optimizer.grad_accum_steps


def _check(condition: bool, key: str, why: str) -> None:
    if not condition:
        raise ConfigError(f"config.{key}: {why}")


def validate(c: ml_collections.ConfigDict, *, num_devices: int | None = None,
             process_count: int | None = None, platform: str | None = None,
             check_inputs: bool = True, resuming: bool = False) -> Resolved:
    """Check every key the trainer reads against each other and the devices; the first bad one raises
    ConfigError. `num_devices` / `process_count` / `platform` ("cpu", "gpu", "tpu") default to this JAX
    runtime's. `check_inputs=False` skips what only a run reads: the data inputs (files, tokenizer) and
    the checkpoint the parameters start from (`init_from`, which upcycling and Stage II need);
    ahead-of-time compilation needs only shapes. `resuming`: the run continues from its own checkpoint,
    so `init_from` is not read (and need not exist any more)."""
    for key in ("total_steps", "log_every_steps"):
        _check(c[key] >= 1, key, f"must be >= 1, got {c[key]}")
    for key in ("checkpoint_every_steps", "eval_every_steps", "max_checkpoints_to_keep"):
        _check(c[key] >= 0, key, f"must be >= 0, got {c[key]}")
    _check(c.init_upcycle in UPCYCLE_ORDERS, "init_upcycle", f"must be one of {UPCYCLE_ORDERS}")
    _check(not check_inputs or not c.init_upcycle or bool(c.init_from), "init_upcycle",
           "needs config.init_from")
    try:
        model = OuroConfig(**c.model.to_dict())
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config.model: {err}") from None
    _check(not c.init_upcycle or model.num_hidden_layers % 2 == 0, "init_upcycle",
           f"model.num_hidden_layers={model.num_hidden_layers} is not twice a source depth")
    if check_inputs and c.init_from and not resuming:
        _check_init_from(c.init_from, model.replace(num_hidden_layers=model.num_hidden_layers // 2)
                         if c.init_upcycle else model)
    objective = _objective(c, check_inputs)
    opt = _optimizer(c)

    try:
        data = pipeline.resolve_config(c.data)
        if check_inputs:
            pipeline.check_inputs(data, vocab_size=model.vocab_size)
    except (ValueError, OSError) as err:
        raise ConfigError(f"config.data: {err}") from None
    _check(data.seq_len >= 2, "data.seq_len", "must be >= 2")
    if model.attention_impl == "splash":
        platform = jax.default_backend() if platform is None else platform
        _check(platform == "tpu", "model.attention_impl",
               f"'splash' is the TPU Pallas kernel; on {platform} use 'xla' (portable) or 'cudnn' (GPU)")
        _check(data.seq_len % 128 == 0, "data.seq_len",
               f"{data.seq_len} must be a multiple of 128 for model.attention_impl='splash'")
    try:
        devices = jax.device_count() if num_devices is None else num_devices
        shape = sharding.mesh_shape(c.mesh.to_dict(), devices)
    except ValueError as err:
        raise ConfigError(f"config.{err}") from None
    mesh = dict(zip(sharding.MESH_AXES, shape, strict=True))
    processes = jax.process_count() if process_count is None else process_count
    rows = mesh["data"] * mesh["fsdp"]
    micro = opt["grad_accum_steps"]
    _check(data.batch_size % (micro * rows) == 0 and data.batch_size % processes == 0, "data.batch_size",
           f"{data.batch_size} rows must split into optimizer.grad_accum_steps={micro} micro-batches over "
           f"data x fsdp = {rows} devices and over {processes} processes")
    return Resolved(model=model, objective=objective, optimizer=opt, mesh=mesh, micro_batches=micro)


def _check_init_from(path: str, model: OuroConfig) -> None:
    """`init_from` exists, holds a checkpoint and computes `model`'s function (before anything compiles)."""
    try:
        check_source(path, model)
    except (FileNotFoundError, run.RunError) as err:
        raise ConfigError(f"config.init_from: {err}") from None


def _objective(c: ml_collections.ConfigDict, check_inputs: bool) -> dict[str, Any]:
    obj = c.objective
    _check(obj.stage in (1, 2), "objective.stage", f"must be 1 or 2, got {obj.stage}")
    if obj.stage == 1:
        _check(obj.beta >= 0, "objective.beta", f"must be >= 0, got {obj.beta}")
        _check(obj.weighting in WEIGHTINGS, "objective.weighting", f"must be one of {WEIGHTINGS}")
        return {"stage": 1, "beta": obj.beta, "weighting": obj.weighting}
    _check(not check_inputs or bool(c.init_from), "init_from",
           "Stage II trains the exit gate of a trained model; set --config.init_from=RUN_OR_CHECKPOINT")
    _check(obj.pairing in ("printed", "next"), "objective.pairing", "must be 'printed' or 'next'")
    _check(obj.k > 0, "objective.k", f"must be > 0, got {obj.k}")
    return {"stage": 2, "k": obj.k, "gamma": obj.gamma, "pairing": obj.pairing}


def _optimizer(c: ml_collections.ConfigDict) -> dict[str, Any]:
    opt = c.optimizer.to_dict()
    _check(opt["schedule"] in SCHEDULES, "optimizer.schedule", f"must be one of {SCHEDULES}")
    _check(opt["learning_rate"] > 0, "optimizer.learning_rate", "must be > 0")
    _check(opt["warmup_steps"] >= 0, "optimizer.warmup_steps", "must be >= 0")
    _check(opt["decay_steps"] >= 0, "optimizer.decay_steps", "must be >= 0")
    _check(0 <= opt["min_lr_ratio"] <= 1, "optimizer.min_lr_ratio", "must lie in [0, 1]")
    _check(opt["clip_norm"] > 0, "optimizer.clip_norm", "must be > 0")
    _check(0 <= opt["b1"] < 1 and 0 <= opt["b2"] < 1, "optimizer.b1/b2", "must lie in [0, 1)")
    _check(opt["grad_accum_steps"] >= 1, "optimizer.grad_accum_steps", "must be >= 1")
    return opt
