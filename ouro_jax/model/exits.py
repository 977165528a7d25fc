"""The exit distribution over loop steps and the exit policies (ouro_spec.md §3), always in float32.

Notation: T loop steps; `gate_logits` [T, ...] are the exit gate's pre-sigmoid outputs per step and
token, `lambda_t = sigmoid(gate_logit_t)` the probability of exiting at step t given step t was reached.
Survival S_t = prod_{j<=t} (1 - lambda_j), S_0 = 1; exit pmf p(t) = lambda_t S_{t-1} for t < T and
p(T) = S_{T-1} (the last step takes the remainder; its lambda is unused); CDF(n) = 1 - S_n, CDF(T) = 1.
Steps are 0-based indices in code (`exit_at_step=0` is the first loop), 1-based in formulas and metrics.
Everything is computed in log space from `log_sigmoid`, so no probability underflows to log(0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def exit_lambdas(gate_logits: jax.Array) -> jax.Array:
    """[T, ...] -> lambda_t = sigmoid(gate_logit_t), float32."""
    return jax.nn.sigmoid(_f32(gate_logits))


def log_survival(gate_logits: jax.Array) -> jax.Array:
    """[T, ...] -> log S_t = sum_{j<=t} log(1 - lambda_j) for t = 1..T, float32."""
    return jnp.cumsum(jax.nn.log_sigmoid(-_f32(gate_logits)), axis=0)


def log_exit_pdf(gate_logits: jax.Array) -> jax.Array:
    """[T, ...] -> log p(t), float32."""
    g = _f32(gate_logits)
    log_surv_before = jnp.concatenate([jnp.zeros_like(g[:1]), log_survival(g)[:-1]], axis=0)
    log_exit_here = jnp.concatenate([jax.nn.log_sigmoid(g[:-1]), jnp.zeros_like(g[:1])], axis=0)
    return log_surv_before + log_exit_here


def exit_pdf(gate_logits: jax.Array) -> jax.Array:
    """[T, ...] -> p(t), sums to 1 over axis 0, float32."""
    return jnp.exp(log_exit_pdf(gate_logits))


def exit_cdf(gate_logits: jax.Array) -> jax.Array:
    """[T, ...] -> CDF(n) = 1 - S_n for n < T and exactly 1 at the last step, float32."""
    cdf = -jnp.expm1(log_survival(gate_logits))
    return cdf.at[-1].set(1.0)


def cdf_reaches(log_surv: jax.Array, q: float | jax.Array) -> jax.Array:
    """The Q-exit test on log S_n (any shape) -> bool: CDF(n) >= q, compared in survival space
    (CDF(n) >= q  <=>  log S_n <= log(1 - q)), which is exact at the edges: q <= 0 always holds,
    q = 1 never holds (S_n > 0)."""
    return log_surv <= jnp.log1p(-jnp.asarray(q, jnp.float32))


def q_exit_step(gate_logits: jax.Array, q: float | jax.Array) -> jax.Array:
    """Q-exit: the first step (0-based) whose CDF >= q (`cdf_reaches`); the last step when none before
    it is, so q <= 0 exits at step 0 and q = 1 always uses the last step. [T, ...] -> int32 [...].
    """
    reached = cdf_reaches(log_survival(gate_logits)[:-1], q)
    num_steps = gate_logits.shape[0]
    return jnp.where(jnp.any(reached, axis=0), jnp.argmax(reached, axis=0),
                     num_steps - 1).astype(jnp.int32)


def select_step(per_step: jax.Array, step: jax.Array | int) -> jax.Array:
    """Per-token gather of one step. per_step [T, B, S, ...], step int or int [B, S] -> [B, S, ...]."""
    step = jnp.asarray(step, jnp.int32)
    if step.ndim == 0:
        return per_step[step]
    index = step.reshape((1, *step.shape) + (1,) * (per_step.ndim - 1 - step.ndim))
    return jnp.take_along_axis(per_step, index, axis=0)[0]


def weighted_logits(logits: jax.Array, pdf: jax.Array) -> jax.Array:
    """Exit-pdf-weighted mixture of logits: [T, B, S, V], [T, B, S] -> [B, S, V] float32."""
    return jnp.einsum("tbsv,tbs->bsv", _f32(logits), _f32(pdf))


def exit_entropy(gate_logits: jax.Array) -> jax.Array:
    """H(p) = -sum_t p(t) log p(t). [T, ...] -> [...] float32."""
    log_p = log_exit_pdf(gate_logits)
    return -jnp.sum(jnp.exp(log_p) * log_p, axis=0)


def expected_exit_step(pdf: jax.Array) -> jax.Array:
    """Mean exit step, 1-based: sum_t t p(t). [T, ...] -> [...] float32."""
    steps = jnp.arange(1, pdf.shape[0] + 1, dtype=jnp.float32)
    return jnp.tensordot(steps, _f32(pdf), axes=(0, 0))
