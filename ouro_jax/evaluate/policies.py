"""Exit rules applied after the fact to a forward pass that computed every loop (arXiv:2510.25741 §5.4.1,
Fig. 5).

A rule maps each token's per-loop signals to its exit loop, a 0-based index l in [0, L) (loop l + 1 in
everything shown to users), chosen among loops that were all computed; the metrics at the chosen loop are
therefore exact, and one forward pass serves every rule and every threshold:

  q_exit        Q-exit (§3.2): the first loop whose exit CDF reaches q (`exits.q_exit_loop`);
  static        loop l for every token, l = 0..L-1 (the per-loop metrics themselves);
  hidden_delta  the first loop l >= 1 with ||h_l - h_{l-1}||_2 < eps, the paper's hidden-state-difference
                threshold (§5.4.1);
  hidden_delta_relative
                the first loop l >= 1 with ||h_l - h_{l-1}||_2 < eps * ||h_{l-1}||_2 (scale-free form);

and the last loop when a rule never fires (the hidden-state rules carry the names of the same rules at
generation time, `ouro_jax.inference.policies`). h_l is the normed state after loop l, the one the exit gate
and the LM head read. Thresholds are traced arrays: a new grid never recompiles.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ouro_jax.model import exits

KINDS = ("q_exit", "static", "hidden_delta", "hidden_delta_relative")
DEFAULT_Q = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
DEFAULT_REL = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)  # small to large models


@dataclasses.dataclass(frozen=True)
class Grid:
    """Thresholds of the swept rules: Q-exit q values, and eps of the absolute / relative hidden-state
    rules (absolute eps is in the units of ||h||, i.e. about sqrt(hidden_size) for a unit-RMS state)."""

    q: tuple[float, ...] = DEFAULT_Q
    hidden_delta: tuple[float, ...] = ()
    hidden_delta_relative: tuple[float, ...] = DEFAULT_REL

    def __post_init__(self):
        if any(not 0.0 <= q <= 1.0 for q in self.q):
            raise ValueError(f"Q-exit thresholds must lie in [0, 1], got {list(self.q)}")
        if any(eps <= 0 for eps in (*self.hidden_delta, *self.hidden_delta_relative)):
            raise ValueError("hidden-state thresholds must be > 0")

    @classmethod
    def default(cls, hidden_size: int) -> Grid:
        """The default grid; absolute thresholds are the relative ones times sqrt(hidden_size), the norm of a
        state of unit RMS, so both hidden-state curves cover a similar range."""
        return cls(hidden_delta=tuple(eps * hidden_size ** 0.5 for eps in DEFAULT_REL))

    def rules(self) -> list[tuple[str, float]]:
        """(kind, threshold) of every swept rule, in the order of `sweep_exit_loops`' leading axis."""
        return ([("q_exit", q) for q in self.q] + [("hidden_delta", e) for e in self.hidden_delta]
                + [("hidden_delta_relative", e) for e in self.hidden_delta_relative])

    def arrays(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The thresholds as float32 arrays [Q], [A], [R] (arguments of the jitted evaluation)."""
        return tuple(jnp.asarray(v, jnp.float32)
                     for v in (self.q, self.hidden_delta, self.hidden_delta_relative))


def label(kind: str, threshold: float) -> str:
    """A short human-readable name of a rule, e.g. `Q-exit q=0.5`, `loop 3`, `‖Δh‖ < 2.1`."""
    if kind == "q_exit":
        return f"Q-exit q={threshold:g}"
    if kind == "static":
        return f"loop {int(threshold)}"
    if kind == "hidden_delta":
        return f"‖Δh‖ < {threshold:.3g}"
    return f"‖Δh‖/‖h‖ < {threshold:.3g}"


def hidden_deltas(hidden: jax.Array) -> tuple[jax.Array, jax.Array]:
    """hidden [L, B, S, D] -> (||h_l - h_{l-1}||_2, ||h_l - h_{l-1}||_2 / ||h_{l-1}||_2), each [L-1, B, S]
    float32 for l = 1..L-1."""
    h = hidden.astype(jnp.float32)
    change = jnp.linalg.norm(h[1:] - h[:-1], axis=-1)
    return change, change / jnp.maximum(jnp.linalg.norm(h[:-1], axis=-1), 1e-30)


def first_below(deltas: jax.Array, eps: jax.Array) -> jax.Array:
    """deltas [L-1, B, S] (of loops 1..L-1), eps [E] -> exit loop [E, B, S] int32: the first loop l >= 1
    with deltas[l-1] < eps, else L-1."""
    num_loops = deltas.shape[0] + 1
    if num_loops == 1:
        return jnp.zeros((eps.shape[0], *deltas.shape[1:]), jnp.int32)
    below = deltas[None] < eps[:, None, None, None]  # [E, L-1, B, S]
    return jnp.where(jnp.any(below, axis=1), 1 + jnp.argmax(below, axis=1), num_loops - 1).astype(jnp.int32)


def sweep_exit_loops(gate_logits: jax.Array, hidden: jax.Array, q: jax.Array, hidden_delta: jax.Array,
                     hidden_delta_relative: jax.Array) -> jax.Array:
    """Exit loop of every token under every swept rule (`Grid.rules` order).

    gate_logits [L, B, S], hidden [L, B, S, D], q [Q], hidden_delta [A], hidden_delta_relative [R]
    -> int32 [Q + A + R, B, S], 0-based loops.
    """
    q_loops = jax.vmap(lambda q1: exits.q_exit_loop(gate_logits, q1))(q)
    absolute, relative = hidden_deltas(hidden)
    return jnp.concatenate([q_loops, first_below(absolute, hidden_delta),
                            first_below(relative, hidden_delta_relative)])
