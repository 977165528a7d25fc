"""Per-token exit policies evaluated loop by loop while a token runs its recurrence
(arXiv:2510.25741 §3.2 Q-exit; the hidden-state-difference threshold of its §5.4.1 / Fig. 5).

`t` is the 0-based loop index (t = 0 is loop 1) of the loop just run. After it a row exits when:
  "fixed"         t == num_loops - 1: full depth, or `exit_at_loop=k` (num_loops = k);
  "gate"          Q-exit: CDF(t) >= q on the survival S_t = prod_{j<=t} (1 - lambda_j),
                  lambda_j = sigmoid(gate_j), tested by `exits.cdf_reaches` as in `exits.q_exit_loop`,
                  so q = 1 never exits before the last loop and q = 0 always exits after loop 1;
  "sample"        the exit loop drawn from the gate's exit distribution p(t) (the one Stage I trains):
                  Q-exit with a fresh q = u ~ U[0, 1) per token and row (`sampling.exit_uniforms`), since
                  P(CDF(t-1) < u <= CDF(t)) = p(t); the threshold argument is then that [B] array;
  "hidden_delta"  training-free, the paper's form: t >= 1 and ||h_t - h_{t-1}||_2 < eps, with h_t the
                  normed state after loop index t (loop 1 has no previous loop state and never exits
                  this way); eps is in the units of ||h|| (about sqrt(D) for a state of unit RMS);
  "hidden_delta_relative"  the scale-free variant: t >= 1 and ||h_t - h_{t-1}||_2 < eps ||h_{t-1}||_2.
(`ouro_jax.evaluate` sweeps the same two rules, by the same names, after the fact.)
Every policy exits after its last loop (index num_loops - 1).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ouro_jax.model import exits

KINDS = ("fixed", "gate", "sample", "hidden_delta", "hidden_delta_relative")


@dataclasses.dataclass(frozen=True)
class ExitPolicy:
    """Static part of a policy; the threshold (q or eps) is a traced scalar, so sweeps never recompile.
    num_loops: the most loops a token may run."""

    kind: str
    num_loops: int

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"exit policy {self.kind!r} must be one of {KINDS}")

    def init(self, hidden: jax.Array) -> tuple[jax.Array, jax.Array]:
        """State before loop 1 from the loop input hidden [B, D]: (log S [B], previous state [B, D]),
        float32 (the input is a placeholder for h_0: loop 1 never compares with it)."""
        return jnp.zeros(hidden.shape[:1], jnp.float32), hidden.astype(jnp.float32)

    def update(self, state, loop, hidden: jax.Array, gate_logit: jax.Array, threshold: jax.Array):
        """After loop index `loop` (0-based): hidden [B, D] normed state, gate_logit [B]
        -> (exit now [B] bool, new state)."""
        log_survival, previous = state
        log_survival = log_survival + jax.nn.log_sigmoid(-gate_logit.astype(jnp.float32))
        hidden = hidden.astype(jnp.float32)
        exit_now = jnp.asarray(loop) == self.num_loops - 1
        if self.kind in ("gate", "sample"):
            exit_now = exit_now | exits.cdf_reaches(log_survival, threshold)
        elif self.kind.startswith("hidden_delta"):
            change = jnp.linalg.norm(hidden - previous, axis=-1)
            if self.kind == "hidden_delta_relative":
                threshold = threshold * jnp.linalg.norm(previous, axis=-1)
            exit_now = exit_now | ((loop > 0) & (change < threshold))
        return jnp.broadcast_to(exit_now, gate_logit.shape), (log_survival, hidden)

    def exit_logprob(self, state, loop: int, gate_logit: jax.Array) -> jax.Array:
        """log p(loop) under the gate's exit distribution over this policy's num_loops loops (`exits`
        module: the last loop takes the remaining survival), from the state BEFORE loop index `loop`
        (0-based) and that loop's gate_logit [B] -> [B] float32."""
        log_survival = state[0]
        if loop == self.num_loops - 1:
            return log_survival
        return log_survival + jax.nn.log_sigmoid(gate_logit.astype(jnp.float32))

    def first_exit(self, hidden: jax.Array, gate_logits: jax.Array, threshold: jax.Array) -> jax.Array:
        """Exit loop index (0-based) of a token whose every loop was computed (the prompt's last position).

        hidden [T, B, D] normed states, gate_logits [T, B] -> [B] int32, the first loop whose `update`
        exits (the loop input is not needed: loop 1 never compares with it). Its log-probability under
        the gate's distribution is `exits.log_exit_pdf(gate_logits)` at that loop.
        """
        state = self.init(hidden[0])
        exited = jnp.zeros(gate_logits.shape[1:], jnp.bool_)
        exit_loop = jnp.full(gate_logits.shape[1:], self.num_loops - 1, jnp.int32)
        for t in range(self.num_loops):
            exit_now, state = self.update(state, t, hidden[t], gate_logits[t], threshold)
            exit_loop = jnp.where(exit_now & ~exited, t, exit_loop)
            exited = exited | exit_now
        return exit_loop
