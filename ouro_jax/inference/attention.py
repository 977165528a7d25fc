"""Attention of one decoded token over the KV cache (the decode `Attend` hook of `DecoderLayer.with_kv`).

Shapes: B batch (or the S rows of a compacted bucket), P prompt positions, M decoded-token positions,
Nq query heads, K kv heads, H head_dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_layers(layers, fn, x):
    """x -> fn(layers[i], x, i) in order -> (x, tuple of the N per-layer outputs, transposed)."""
    outs = []
    for i, layer in enumerate(layers):
        x, out = fn(layer, x, i)
        outs.append(out)
    return x, tuple(zip(*outs, strict=True))


def cached_attention(q, k, v, cached, prompt_valid, decoded_valid, scale):
    """One new token over prompt, earlier decoded tokens and itself.

    q [B, 1, Nq, H]; k, v [B, 1, K, H] (its own, this loop); cached = (prompt_k, prompt_v [B, K, P, H],
    decoded_k, decoded_v [B, K, M, H]); prompt_valid [B, P], decoded_valid [B, M] bool. Scores and
    softmax in float32 over the three parts jointly -> [B, 1, Nq, H].
    """
    prompt_k, prompt_v, decoded_k, decoded_v = cached
    b, _, nq, h = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(b, kv_heads, nq // kv_heads, h)
    f32 = dict(preferred_element_type=jnp.float32)
    low = jnp.finfo(jnp.float32).min
    s_prompt = jnp.einsum("bkgh,bkph->bkgp", qg, prompt_k, **f32)
    s_prompt = jnp.where(prompt_valid[:, None, None, :], s_prompt, low)
    s_decoded = jnp.einsum("bkgh,bkmh->bkgm", qg, decoded_k, **f32)
    s_decoded = jnp.where(decoded_valid[:, None, None, :], s_decoded, low)
    s_self = jnp.einsum("bkgh,bkh->bkg", qg, k[:, 0], **f32)[..., None]
    probs = jax.nn.softmax(jnp.concatenate([s_prompt, s_decoded, s_self], -1) * scale, axis=-1)
    p, m = prompt_k.shape[2], decoded_k.shape[2]
    dtype = v.dtype
    context = (jnp.einsum("bkgp,bkph->bkgh", probs[..., :p].astype(dtype), prompt_v, **f32)
               + jnp.einsum("bkgm,bkmh->bkgh", probs[..., p:p + m].astype(dtype), decoded_v, **f32)
               + probs[..., p + m:] * v[:, 0, :, None, :].astype(jnp.float32))
    return context.reshape(b, 1, nq, h).astype(q.dtype)


def on_rows_of_batch(attend, rows, batch, q, k, v, cached):
    """`attend` for rows `rows` [S] (indices >= batch: padding) over the whole batch's cache slots: q, k, v
    [S, 1, ., H] are spread into `batch` rows (zeros elsewhere), the rows' outputs kept -> [S, 1, Nq, H]."""
    def spread(x):
        return jnp.zeros((batch, *x.shape[1:]), x.dtype).at[rows].set(x, mode="drop")

    return jnp.take(attend(spread(q), spread(k), spread(v), cached=cached), rows, axis=0, mode="clip")
