"""Per-token exit policies evaluated step by step while a token runs its loop (ouro_spec.md §3, §8.4).

Steps are 0-based (t = 0 is the first loop). After step t a row exits when:
  "fixed"         t == num_steps - 1: full depth, or step k with `exit_at_step=k` (num_steps = k+1);
  "gate"          Q-exit: CDF(t) >= q on the survival S_t = prod_{j<=t} (1 - lambda_j),
                  lambda_j = sigmoid(gate_j), tested by `exits.cdf_reaches` as in `exits.q_exit_step`,
                  so q = 1 never exits before the last step and q = 0 always exits at step 0;
  "hidden_delta"  training-free: t >= 1 and ||h_t - h_{t-1}|| / ||h_{t-1}|| < eps, with h_t the normed
                  state after step t (step 0 has no previous loop state and never exits this way).
Every policy exits at the last step num_steps - 1.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ouro_jax.model import exits

KINDS = ("fixed", "gate", "hidden_delta")


@dataclasses.dataclass(frozen=True)
class ExitPolicy:
    """Static part of a policy; the threshold (q or eps) is a traced scalar, so sweeps never recompile."""

    kind: str
    num_steps: int

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"exit policy {self.kind!r} must be one of {KINDS}")

    def init(self, hidden: jax.Array) -> tuple[jax.Array, jax.Array]:
        """State before step 0 from the loop input hidden [B, D]: (log S [B], previous state [B, D]),
        float32 (the input is a placeholder for h_{-1}: step 0 never compares with it)."""
        return jnp.zeros(hidden.shape[:1], jnp.float32), hidden.astype(jnp.float32)

    def update(self, state, step, hidden: jax.Array, gate_logit: jax.Array, threshold: jax.Array):
        """After `step`: hidden [B, D] normed state, gate_logit [B] -> (exit now [B] bool, new state)."""
        log_survival, previous = state
        log_survival = log_survival + jax.nn.log_sigmoid(-gate_logit.astype(jnp.float32))
        hidden = hidden.astype(jnp.float32)
        exit_now = jnp.asarray(step) == self.num_steps - 1
        if self.kind == "gate":
            exit_now = exit_now | exits.cdf_reaches(log_survival, threshold)
        elif self.kind == "hidden_delta":
            change = jnp.linalg.norm(hidden - previous, axis=-1)
            exit_now = exit_now | ((step > 0) & (change < threshold * jnp.linalg.norm(previous, axis=-1)))
        return jnp.broadcast_to(exit_now, gate_logit.shape), (log_survival, hidden)

    def first_exit(self, hidden: jax.Array, gate_logits: jax.Array, threshold: jax.Array) -> jax.Array:
        """Exit step of a token whose every step was computed (the prompt's last position).

        hidden [T, B, D] normed states, gate_logits [T, B] -> [B] int32, the first step whose `update`
        exits (the loop input is not needed: step 0 never compares with it).
        """
        state = self.init(hidden[0])
        exited = jnp.zeros(gate_logits.shape[1:], jnp.bool_)
        exit_step = jnp.full(gate_logits.shape[1:], self.num_steps - 1, jnp.int32)
        for t in range(self.num_steps):
            exit_now, state = self.update(state, t, hidden[t], gate_logits[t], threshold)
            exit_step = jnp.where(exit_now & ~exited, t, exit_step)
            exited = exited | exit_now
        return exit_step
