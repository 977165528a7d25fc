"""Token selection: greedy, or temperature / top-k / top-p (nucleus) sampling.

Randomness is per row: row b draws its i-th generated token (i = 0..M-1) with the key
fold_in(key(seed_b), i). A row's samples therefore depend only on its own seed, prompt and position,
never on the batch it is in, so a ragged batch samples exactly what each row samples alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def row_keys(seeds: jax.Array) -> jax.Array:
    """seeds [B] int -> [B] PRNG keys."""
    return jax.vmap(jax.random.key)(seeds)


def sample(logits: jax.Array, keys: jax.Array, index: jax.Array, *, greedy: bool,
           temperature: jax.Array, top_k: int | None, top_p: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Pick one token per row and give its log-probability.

    logits [B, V]; keys [B] row keys; index: the generated-token index folded into the keys.
    greedy: argmax (ties -> lowest id), the other arguments are ignored. Otherwise logits / temperature,
    keep the `top_k` largest, then the smallest set of tokens whose probability reaches `top_p`
    (the most likely token is always kept), and sample. Returns (tokens [B] int32, logprobs [B] float32):
    the log-probability of each token under the distribution it was drawn from, AFTER the top-k / top-p
    truncation (the truncated distribution renormalised: exactly the sampler's, as a policy gradient
    needs); greedy uses temperature 1, i.e. log_softmax(logits).
    """
    logits = logits.astype(jnp.float32)
    if greedy:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return tokens, token_logprobs(logits, tokens)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        ordered = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
        cutoff = jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    token_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, index)
    tokens = jax.vmap(jax.random.categorical)(token_keys, logits).astype(jnp.int32)
    return tokens, token_logprobs(logits, tokens)


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log_softmax(logits [B, V])[b, tokens[b]] -> [B] float32 (entries of -inf are excluded tokens)."""
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
