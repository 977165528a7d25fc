"""Prompt log-probabilities (OpenAI `echo` + `logprobs`): a teacher-forced forward of the prompt through
`Ouro.loop`, each position read at its exit loop (the last loop, or its Q-exit loop under a threshold),
as `ouro_jax.evaluate.lm_eval` scores."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ouro_jax.model import exits
from ouro_jax.serve.backend import shape_bucket


@functools.partial(jax.jit, static_argnames=("graphdef", "top", "q_exit"))
def _score(graphdef, params, ids, threshold, top: int, q_exit: bool):
    """ids [1, S] -> (log-prob of token s + 1 after tokens 0..s [S], the top `top` log-probs and ids
    [S, top]) at each position's exit loop; float32."""
    model = nnx.merge(graphdef, params)
    targets = jnp.roll(ids, -1, axis=1)

    def readout(hidden):
        logp = jax.nn.log_softmax(model.logits(hidden).astype(jnp.float32), axis=-1)
        top_logp, top_ids = jax.lax.top_k(logp, top)
        return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0], top_logp, top_ids

    per_loop, gate_logits = model.loop(ids, readout)
    loop = exits.q_exit_loop(gate_logits, threshold) if q_exit else gate_logits.shape[0] - 1
    return tuple(exits.select_loop(x, loop)[0] for x in per_loop)


def prompt_logprobs(model, prompt: list[int], exit_threshold: float | None,
                    top: int) -> tuple[list[float | None], list[dict[int, float] | None]]:
    """The log-probability of every prompt token given the ones before it (None for the first) and the
    `top` most likely ids with theirs (None for the first), at each position's exit loop."""
    graphdef, params = nnx.split(model)
    n = len(prompt)
    ids = np.zeros((1, shape_bucket(n)), np.int32)  # right padding: causal attention ignores it
    ids[0, :n] = prompt
    logp, top_logp, top_ids = jax.device_get(_score(
        graphdef, params, ids, jnp.float32(exit_threshold or 0.0), max(top, 1), exit_threshold is not None))
    token_logprobs = [None] + [float(x) for x in logp[:n - 1]]
    tops = [None] + [{int(i): float(x) for i, x in zip(top_ids[s, :top], top_logp[s, :top], strict=True)}
                     for s in range(n - 1)]
    return token_logprobs, tops
