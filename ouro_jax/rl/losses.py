"""Advantages and policy-gradient losses of on-policy RL, as pure functions (float32 in, float32 out).

Shapes: P prompts, G samples per prompt (a group), B = P * G rollouts (row b = prompt b // G), M generated
tokens per rollout, T loops. `mask` [B, M] is 1 on a rollout's generated tokens (its stop token included)
and 0 after it. Log-probs are of the sampled tokens: `logp` from the replay (differentiated), `old_logp`
the sampler's record, `ref_logp` a frozen reference model's.

Advantages (`advantages`): A = r - mean_group(r) (the group baseline, Dr. GRPO's unnormalised form), or
divided by the group's std (GRPO, `std="group"`, unbiased as torch.std) or by the batch's std
(`std="batch"`, as LoopedLMs/ouro_rl). Groups whose rewards are all equal carry no signal
(`zero_variance`); the trainer drops them from the loss and logs their fraction.

Policy losses, per token, aggregated by `aggregate` ("token_mean": sum over the batch's tokens / their
number; "constant": sum / (B * M), Dr. GRPO's length-unbiased form), with rho = exp(logp - old_logp):
  grpo   -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)  (PPO's clipped surrogate);
  cispo  -sg(min(rho, cispo_max)) A logp  (truncated importance weight, stop-gradient; ScaleRL).
With one update per batch and exact replay rho = 1 and both are REINFORCE with a baseline.
Optional KL to a frozen reference: k3 = exp(ref - logp) - (ref - logp) - 1 per token (unbiased, >= 0).

The depth as an action (sampled exits): a token's action is (e, y) with
log pi = log p(e) + log p^(e)(y), log p(e) = sum_{j<e} log(1 - lambda_j) + [e < T] log lambda_e
(`exit_logprob`, `exits.log_exit_pdf`), and the reward pays for depth: r - lambda * mean loops per token
(`depth_cost`). Per-loop credit (`loop_credit`, RLTT arXiv:2602.10520, an ablation) replaces log pi by
sum_t w_t log p^(t)(y) over the loops the token ran, with w uniform or the exit pdf (stop-gradient).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ouro_jax.model import exits

STD_MODES = ("none", "group", "batch")
LOSSES = ("grpo", "cispo")
AGGREGATIONS = ("token_mean", "constant")
CREDITS = ("exit", "uniform", "exit_pdf")  # exit: the sampled loop's log-prob; else `loop_credit`


def zero_variance(rewards: jax.Array) -> jax.Array:
    """rewards [P, G] -> [P] bool: every sample of the group got the same reward."""
    return jnp.all(rewards == rewards[:, :1], axis=1)


def advantages(rewards: jax.Array, std: str = "none", eps: float = 1e-6) -> jax.Array:
    """rewards [P, G] -> advantages [P, G] float32: r - group mean, divided by the group's (unbiased) or
    the batch's std + eps when `std` is "group" / "batch" ("none": Dr. GRPO)."""
    if std not in STD_MODES:
        raise ValueError(f"std={std!r} must be one of {STD_MODES}")
    r = rewards.astype(jnp.float32)
    centred = r - jnp.mean(r, axis=1, keepdims=True)
    if std == "group":
        return centred / (jnp.std(r, axis=1, keepdims=True, ddof=1) + eps)
    if std == "batch":
        return centred / (jnp.std(r) + eps)
    return centred


def aggregate(per_token: jax.Array, mask: jax.Array, how: str = "token_mean") -> jax.Array:
    """per_token, mask [B, M] -> scalar: sum(per_token * mask) over the tokens (token_mean) or over B * M
    (constant)."""
    if how not in AGGREGATIONS:
        raise ValueError(f"aggregation {how!r} must be one of {AGGREGATIONS}")
    total = jnp.sum(per_token * mask)
    return total / (jnp.maximum(jnp.sum(mask), 1.0) if how == "token_mean" else mask.size)


def policy_loss(logp: jax.Array, old_logp: jax.Array, advantage: jax.Array, mask: jax.Array, *,
                kind: str = "cispo", eps_low: float = 0.2, eps_high: float = 0.2, cispo_max: float = 5.0,
                how: str = "token_mean") -> tuple[jax.Array, dict[str, jax.Array]]:
    """The policy-gradient loss. logp, old_logp, mask [B, M]; advantage [B] (one per rollout)
    -> (scalar loss, {"clip_fraction": tokens whose ratio was clipped / truncated, "ratio_mean"})."""
    if kind not in LOSSES:
        raise ValueError(f"loss {kind!r} must be one of {LOSSES}")
    ratio = jnp.exp(logp - old_logp)
    a = advantage[:, None]
    if kind == "grpo":
        clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
        per_token = -jnp.minimum(ratio * a, clipped * a)
        was_clipped = (ratio * a) > (clipped * a)
    else:
        weight = jax.lax.stop_gradient(jnp.minimum(ratio, cispo_max))
        per_token = -weight * a * logp
        was_clipped = ratio > cispo_max
    count = jnp.maximum(jnp.sum(mask), 1.0)
    return aggregate(per_token, mask, how), {
        "clip_fraction": jnp.sum(was_clipped * mask) / count,
        "ratio_mean": jax.lax.stop_gradient(jnp.sum(ratio * mask) / count)}


def k3_kl(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """Per-token k3 estimate of KL(pi || ref) from samples of pi: exp(d) - d - 1 with d = ref - logp."""
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


def exit_logprob(gate_logits: jax.Array, exit_index: jax.Array) -> jax.Array:
    """log p(e) of each token's exit under the gate's exit distribution: gate_logits [T, B, M],
    exit_index [B, M] 0-based -> [B, M] float32 (`exits.log_exit_pdf` at e)."""
    return exits.select_loop(exits.log_exit_pdf(gate_logits), exit_index)


def loop_credit(loop_logprobs: jax.Array, exit_index: jax.Array, weighting: str,
                gate_logits: jax.Array | None = None) -> jax.Array:
    """RLTT-style per-loop surrogate sum_t w_t log p^(t)(y) over the loops each token ran (t <= e).

    loop_logprobs [T, B, M]; exit_index [B, M]; weighting "uniform" (w_t = 1 / (e + 1)) or "exit_pdf"
    (w_t = p(t) renormalised over t <= e, from gate_logits [T, B, M], stop-gradient) -> [B, M].
    """
    ran = jnp.arange(loop_logprobs.shape[0])[:, None, None] <= exit_index[None]
    if weighting == "uniform":
        w = ran.astype(jnp.float32)
    elif weighting == "exit_pdf":
        w = jax.lax.stop_gradient(exits.exit_pdf(gate_logits)) * ran
    else:
        raise ValueError(f"per-loop weighting {weighting!r} must be 'uniform' or 'exit_pdf'")
    w = w / jnp.maximum(jnp.sum(w, axis=0, keepdims=True), 1e-30)
    return jnp.sum(w * loop_logprobs, axis=0)


def depth_cost(rewards: jax.Array, exit_loops: jax.Array, mask: jax.Array, cost: float) -> jax.Array:
    """rewards [B] - cost * the mean exit loop (1-based, loops run) over each rollout's tokens
    (exit_loops, mask [B, M]) -> [B] float32."""
    loops = jnp.sum(exit_loops * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
    return rewards.astype(jnp.float32) - cost * loops
