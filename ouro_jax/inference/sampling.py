"""Token selection: greedy, or temperature / top-k / top-p (nucleus) sampling.

Randomness is per row: row b draws its i-th generated token (i = 0..M-1) with the key
fold_in(key(seed_b), i). A row's samples therefore depend only on its own seed, prompt and position,
never on the batch it is in, so a ragged batch samples exactly what each row samples alone.
Sampled exits (exit policy "sample") draw from a separate stream of the same row key,
fold_in(fold_in(key(seed_b), EXIT_STREAM), i): the exit draws never shift the tokens' keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

EXIT_STREAM = 0x65786974  # "exit": the fold_in of the row key that the exit draws come from


def exit_uniforms(keys: jax.Array, index: jax.Array) -> jax.Array:
    """u ~ U[0, 1) float32 per row for generated token `index` (scalar or [B]): the Q-exit threshold of a
    sampled exit (`policies.py`, "sample"). keys [B] row keys -> [B]."""
    keys = jax.vmap(jax.random.fold_in, (0, None))(keys, EXIT_STREAM)
    keys = jax.vmap(jax.random.fold_in)(keys, jnp.broadcast_to(index, keys.shape))
    return jax.vmap(lambda k: jax.random.uniform(k, dtype=jnp.float32))(keys)


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
        logits = jnp.where(logits < jax.lax.top_k(logits, top_k)[0][:, -1:], -jnp.inf, logits)
    if top_p is not None:
        logits = _nucleus(logits, -jnp.sort(-logits, axis=-1), top_p)
    token_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, index)
    tokens = jax.vmap(jax.random.categorical)(token_keys, logits).astype(jnp.int32)
    return tokens, token_logprobs(logits, tokens)


def _nucleus(logits, ordered, top_p):
    """logits [B, V] with the tokens outside the smallest most-likely set reaching `top_p` (scalar or
    [B, 1]) set to -inf; ordered: the logits sorted in descending order."""
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
    cutoff = jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def sample_rows(logits: jax.Array, keys: jax.Array, index: jax.Array, temperature: jax.Array,
                top_k: jax.Array, top_p: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`sample` with settings per row (traced: one compilation serves every mix of requests).

    logits [B, V]; keys [B]; index [B] generated-token index of each row; temperature [B] (0: greedy),
    top_k [B] int (0: off), top_p [B] (1: off). A row draws what `sample` draws with its settings and key.
    """
    logits = logits.astype(jnp.float32)
    greedy = temperature <= 0
    scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]
    ordered = -jnp.sort(-scaled, axis=-1)
    kth = jnp.take_along_axis(ordered, jnp.clip(top_k - 1, 0)[:, None], axis=-1)
    scaled = jnp.where((top_k[:, None] > 0) & (scaled < kth), -jnp.inf, scaled)
    ordered = jnp.where((top_k[:, None] > 0) & (ordered < kth), -jnp.inf, ordered)
    scaled = jnp.where((top_p < 1)[:, None], _nucleus(scaled, ordered, top_p[:, None]), scaled)
    token_keys = jax.vmap(jax.random.fold_in)(keys, index)
    drawn = jax.vmap(jax.random.categorical)(token_keys, scaled).astype(jnp.int32)
    tokens = jnp.where(greedy, jnp.argmax(logits, axis=-1).astype(jnp.int32), drawn)
    return tokens, jnp.where(greedy, token_logprobs(logits, tokens), token_logprobs(scaled, tokens))


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log_softmax(logits [B, V])[b, tokens[b]] -> [B] float32 (entries of -inf are excluded tokens)."""
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
