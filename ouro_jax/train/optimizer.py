"""Optimiser (arXiv:2510.25741 §4, Table 1): AdamW (0.9, 0.95), weight decay 0.1 off for norms and the
gate bias, global-norm clipping 1.0, warmup + constant / warmup-stable-decay / cosine schedules; Stage II
trains only the exit gate. Parameters are pure nested dicts (`nnx.to_pure_dict`); the trainer shards
every copy of them inside the optimiser state like the parameters (`sharding.optimizer_state_shardings`)."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import optax

SCHEDULES = ("constant", "wsd", "cosine")


def learning_rate_schedule(opt: Mapping, total_steps: int) -> optax.Schedule:
    """Linear warmup to `learning_rate`, then:
    constant: hold (paper Stage 1a/1b/3);
    wsd: hold, then decay linearly to `learning_rate * min_lr_ratio` over the last `decay_steps`;
    cosine: cosine decay to `learning_rate * min_lr_ratio` by `total_steps` (Stage 2/4)."""
    peak, warmup = opt["learning_rate"], opt["warmup_steps"]
    floor = peak * opt["min_lr_ratio"]
    warm = optax.linear_schedule(0.0, peak, warmup) if warmup else optax.constant_schedule(peak)
    after = max(total_steps - warmup, 1)
    if opt["schedule"] == "constant":
        rest = optax.constant_schedule(peak)
    elif opt["schedule"] == "cosine":
        rest = optax.cosine_decay_schedule(peak, after, alpha=opt["min_lr_ratio"])
    elif opt["schedule"] == "wsd":
        decay = min(opt["decay_steps"], after)
        rest = optax.join_schedules(
            [optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay)],
            [after - decay])
    else:
        raise ValueError(f"optimizer.schedule={opt['schedule']!r} must be one of {SCHEDULES}")
    return optax.join_schedules([warm, rest], [warmup])


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in path)


def decay_mask(params) -> dict:
    """True where weight decay applies: every parameter except RMSNorm weights and the gate bias."""
    def decays(path, _):
        names = _path_names(path)
        return not ("norm" in names[-2] or names[-2:] == ("early_exit_gate", "bias"))
    return jax.tree_util.tree_map_with_path(decays, params)


def trainable_mask(params, stage: int) -> dict:
    """Stage I trains everything; Stage II only `early_exit_gate`."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: stage != 2 or _path_names(path)[0] == "early_exit_gate", params)


def make_optimizer(opt: Mapping, total_steps: int, params, stage: int) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW with masked decay; frozen parameters get zero updates."""
    tx = optax.chain(
        optax.clip_by_global_norm(opt["clip_norm"]),
        optax.adamw(learning_rate_schedule(opt, total_steps), b1=opt["b1"], b2=opt["b2"],
                    eps=opt["eps"], weight_decay=opt["weight_decay"], mask=decay_mask(params)),
    )
    if stage == 2:
        labels = jax.tree.map(lambda t: "train" if t else "freeze", trainable_mask(params, stage))
        tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
    return tx


def apply_updates(params, updates, trainable) -> dict:
    """params + updates on trainable leaves; frozen leaves are returned untouched (bit-identical)."""
    return jax.tree.map(lambda p, u, t: (p + u.astype(p.dtype)) if t else p, params, updates, trainable)
