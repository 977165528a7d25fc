"""The exit distribution over loops and Q-exit (arXiv:2510.25741 §3.2), always in float32.

Notation: T loops, numbered 1..T; `gate_logits` [T, ...] are the exit gate's pre-sigmoid outputs per loop
and token, `lambda_t = sigmoid(gate_logit_t)` the probability of exiting after loop t given loop t was
reached. Survival S_t = prod_{j<=t} (1 - lambda_j), S_0 = 1; exit pmf p(t) = lambda_t S_{t-1} for t < T and
p(T) = S_{T-1} (the last loop takes the remainder; its lambda is unused); CDF(n) = 1 - S_n, CDF(T) = 1.
Arrays hold loop t at index t - 1 of their leading axis; the functions that return or take a position on
that axis (`q_exit_loop`, `select_loop`) call it a loop index: 0-based, index i is loop i + 1.
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
    """[T, ...] -> CDF(n) = 1 - S_n for n < T and exactly 1 at the last loop, float32."""
    cdf = -jnp.expm1(log_survival(gate_logits))
    return cdf.at[-1].set(1.0)


def cdf_reaches(log_surv: jax.Array, q: float | jax.Array) -> jax.Array:
    """The Q-exit test on log S_n (any shape) -> bool: CDF(n) >= q, compared in survival space
    (CDF(n) >= q  <=>  log S_n <= log(1 - q)), which is exact at the edges: q <= 0 always holds,
    q = 1 never holds (S_n > 0)."""
    return log_surv <= jnp.log1p(-jnp.asarray(q, jnp.float32))


def q_exit_loop(gate_logits: jax.Array, q: float | jax.Array) -> jax.Array:
    """Q-exit: the loop index (0-based) of the first loop whose CDF >= q (`cdf_reaches`); the last loop
    when none before it is, so q <= 0 exits after loop 1 (index 0) and q = 1 always runs all T loops.
    [T, ...] -> int32 [...].
    """
    reached = cdf_reaches(log_survival(gate_logits)[:-1], q)
    num_loops = gate_logits.shape[0]
    return jnp.where(jnp.any(reached, axis=0), jnp.argmax(reached, axis=0),
                     num_loops - 1).astype(jnp.int32)


def select_loop(per_loop: jax.Array, loop: jax.Array | int, axis: int = 1) -> jax.Array:
    """Gather one loop per element: per_loop [T, ...] -> per_loop without its leading T axis.

    loop: a 0-based loop index, an int for all, or an int array whose axes are the axes `axis`,
    `axis + 1`, ... of per_loop (e.g. [B, S] for per-token logits [T, B, S, V]; [B] with `axis=2` for
    per-row K/V [T, N, B, K, H]); it is broadcast over the other axes.
    """
    loop = jnp.asarray(loop, jnp.int32)
    if loop.ndim == 0:
        return per_loop[loop]
    shape = (1,) * axis + loop.shape + (1,) * (per_loop.ndim - axis - loop.ndim)
    index = jnp.broadcast_to(loop.reshape(shape), (1, *per_loop.shape[1:]))
    return jnp.take_along_axis(per_loop, index, axis=0)[0]


def weighted_logits(logits: jax.Array, pdf: jax.Array) -> jax.Array:
    """Exit-pdf-weighted mixture of logits: [T, B, S, V], [T, B, S] -> [B, S, V] float32."""
    return jnp.einsum("tbsv,tbs->bsv", _f32(logits), _f32(pdf))


def exit_entropy(gate_logits: jax.Array) -> jax.Array:
    """H(p) = -sum_t p(t) log p(t). [T, ...] -> [...] float32."""
    log_p = log_exit_pdf(gate_logits)
    return -jnp.sum(jnp.exp(log_p) * log_p, axis=0)


def expected_exit_loop(pdf: jax.Array) -> jax.Array:
    """Mean exit loop, 1-based (the expected number of loops run): sum_t t p(t). [T, ...] -> [...] float32."""
    loops = jnp.arange(1, pdf.shape[0] + 1, dtype=jnp.float32)
    return jnp.tensordot(loops, _f32(pdf), axes=(0, 0))
