"""Exit replay: the trainer's parallel, teacher-forced forward that reproduces what `generate` computed.

A rollout records, per generated token, its id and its exit loop (reference/rl_facts.md, "the exit-replay
contract"). The replay runs prompt ⊕ generated tokens through the T loops at once and, for every token,
freezes its state after its exit loop, so the logits read at a token equal the logits it was sampled from.
It never recomputes an exit: recomputing them on another numeric path flips borderline decisions.

Shapes: B batch, P prompt length (left-padded as `generate` takes it), M generated tokens per row,
S = P + M - 1 replayed columns (the last generated token is never fed back), T loops, N layers, K kv heads,
H head_dim, V vocab. Column P - 1 + i produces generated token i (i = 0..M-1): column P - 1 is the last
prompt column (the prefill's first token), column P + i - 1 is generated token i - 1 fed back.

What each column is, as `generate` (decode.py, cache.py) computes it:
  * prompt columns run all T loops with real K/V at every loop (the prefill); the last one's logits are
    read at generated token 0's exit loop;
  * a fed-back column with exit loop index e runs loops 0..e; its state (and so its logits and gate) is
    frozen after loop e. What later columns read at loop t > e is `skipped_kv` (kv_sharing "none"):
      compute  its real loop-t K/V: the state keeps running, the exit only picks the logits;
      copy     its loop-e K/V of the same layer;
      project  layer l's K/V projection of the exit state (`DecoderLayer.kv`);
    with kv_sharing "last" / "average" later columns read, at every loop, one entry per layer: the K/V
    of its loop e ("last") or their mean over loops 0..e ("average", in float32), while a column's own
    query always reads its own fresh K/V.
Under kv_sharing "none" loop t needs only loops <= t of earlier columns, so one parallel pass is exact
and fully differentiable. Under sharing a column's entry needs all of its loops before any later column
runs loop 0: the replay iterates parallel passes (Jacobi) until the entries stop changing, bitwise
(column j is exact after pass j + 1, so at most M passes), then runs one more pass on those entries for
the outputs; gradients flow through that last pass only (not from a column's shared entry into later
columns).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ouro_jax.inference.cache import SHARING
from ouro_jax.inference.decode import SKIPPED_KV
from ouro_jax.model import exits
from ouro_jax.model.layers import rope_cos_sin


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Columns:
    """One replay batch, column-major as the model sees it.

    ids [B, S] int32; positions [B, S] int32 RoPE positions (0 at a row's first real token); valid [B, S]
    bool (not left padding); exit_index [B, S] int32 the loop index whose state a column's readout uses
    (T - 1 for prompt columns before the last); kv_exit [B, S] int32 the last loop with real K/V for
    later columns (T - 1 for prompt columns); decoded [B, S] bool fed-back columns; targets [B, S] int32
    the token each column produced (0 where none).
    """

    ids: jax.Array
    positions: jax.Array
    valid: jax.Array
    exit_index: jax.Array
    kv_exit: jax.Array
    decoded: jax.Array
    targets: jax.Array


def columns(input_ids, prompt_lengths, tokens, exit_loops, num_loops: int) -> Columns:
    """A rollout as replay columns (host-side, NumPy).

    input_ids [B, P] left-padded prompts, prompt_lengths [B]; tokens [B, M] generated ids; exit_loops
    [B, M] their 1-based exit loops, 0 where the row had stopped (as `GenerateOutput`); num_loops: the
    loops the rollout could run (T, or k with `exit_at_loop=k`).
    """
    ids, tokens = np.asarray(input_ids, np.int32), np.asarray(tokens, np.int32)
    lengths, exit_loops = np.asarray(prompt_lengths, np.int32), np.asarray(exit_loops, np.int32)
    (b, p), m = ids.shape, tokens.shape[1]
    if exit_loops.shape != tokens.shape or exit_loops.max() > num_loops:
        raise ValueError(f"exit_loops must be [{b}, {m}] loops in 0..{num_loops}")
    exit_index = np.where(exit_loops > 0, exit_loops - 1, num_loops - 1)
    full = np.full((b, p - 1), num_loops - 1, np.int32)
    pad = (p - lengths)[:, None]
    column = np.arange(p + m - 1)[None]
    return Columns(
        ids=jnp.asarray(np.concatenate([ids, tokens[:, :-1]], axis=1)),
        positions=jnp.asarray(np.maximum(column - pad, 0).astype(np.int32)),
        valid=jnp.asarray(column >= pad),
        exit_index=jnp.asarray(np.concatenate([full, exit_index], axis=1)),
        kv_exit=jnp.asarray(np.concatenate([full, np.full((b, 1), num_loops - 1), exit_index[:, 1:]], 1)),
        decoded=jnp.asarray(column >= p),
        targets=jnp.asarray(np.concatenate([np.zeros((b, p - 1), np.int32), tokens], axis=1)))


def generated(x: jax.Array, prompt_width: int, axis: int = -1) -> jax.Array:
    """The M columns that produced generated tokens (P - 1 .. S - 1) of a per-column array."""
    return jax.lax.slice_in_dim(x, prompt_width - 1, x.shape[axis], axis=axis % x.ndim)


def _attention(q, k, v, k_read, v_read, valid, scale):
    """Causal attention where a query reads other columns' (k_read, v_read) and its own (k, v).

    q [B, S, Nq, H]; k, v, k_read, v_read [B, S, K, H]; valid [B, S] keys that are not padding
    -> [B, S, Nq, H]. Scores and softmax in float32 (as the decoder's cached attention).
    """
    b, s, nq, h = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(b, s, kv_heads, nq // kv_heads, h)
    f32 = dict(preferred_element_type=jnp.float32)
    others = jnp.einsum("bskgh,btkh->bkgst", qg, k_read, **f32)
    own = jnp.einsum("bskgh,bskh->bkgs", qg, k, **f32)
    column = jnp.arange(s)
    earlier = (column[None, :] < column[:, None])[None] & valid[:, None, :]  # [B, S(query), S(key)]
    scores = jnp.where(earlier[:, None, None], others, jnp.finfo(jnp.float32).min)
    scores = jnp.where(jnp.eye(s, dtype=bool), own[..., None], scores)
    probs = jax.nn.softmax(scores * scale, axis=-1)
    diagonal = jnp.einsum("bkgss->bkgs", probs)
    off = jnp.where(jnp.eye(s, dtype=bool), 0.0, probs)
    context = (jnp.einsum("bkgst,btkh->bskgh", off.astype(v.dtype), v_read, **f32)
               + jnp.einsum("bkgs,bskh->bskgh", diagonal, v.astype(jnp.float32)))
    return context.reshape(b, s, nq, h).astype(q.dtype)


def _layers(graphdef, stacked, h, cos, sin, valid, replace, fill, project_from):
    """One loop through the N stacked layers (a scan) where other columns read, for the columns in
    `replace` [B, S], `fill` = (k, v) [N, B, S, K, H] instead of their fresh K/V, or (project_from
    [B, S, D] given) each layer's K/V projection of it -> (h [B, S, D], (k, v) [N, B, S, K, H] fresh)."""
    scale = cos.shape[-1] ** -0.5

    def one_layer(x, layer_in):
        params, fill_k, fill_v = layer_in
        layer = nnx.merge(graphdef, params)
        if project_from is not None:
            fill_k, fill_v = layer.kv(project_from, cos, sin)

        def attend(q, k, v):
            if replace is None:
                return _attention(q, k, v, k, v, valid, scale)
            where = replace[:, :, None, None]
            return _attention(q, k, v, jnp.where(where, fill_k, k), jnp.where(where, fill_v, v), valid, scale)

        return layer.with_kv(x, cos, sin, attend)

    return jax.lax.scan(one_layer, h, (stacked, *fill))


def _one_pass(model, cols: Columns, readout, skipped_kv: str, kv_sharing: str, num_loops: int, shared):
    """T loops over all columns. shared: (k, v) [N, B, S, K, H] entries of decoded columns under sharing
    (None otherwise) -> (readouts [T, ...], gate_logits [T, B, S], new shared entries or None)."""
    cfg = model.config
    cos, sin = rope_cos_sin(cols.positions, cfg.head_dim, cfg.rope_theta, cfg.compute_jnp_dtype)
    graphdef, stacked = nnx.split(model.layers)
    h = h_out = model.embed(cols.ids)
    n, (b, s) = cfg.num_hidden_layers, cols.ids.shape
    kv_zeros = jnp.zeros((n, b, s, cfg.num_key_value_heads, cfg.head_dim), h.dtype)
    frozen = (kv_zeros, kv_zeros)  # each column's K/V at its last loop <= kv_exit
    total = (kv_zeros.astype(jnp.float32),) * 2  # average: K/V summed over the loops <= kv_exit
    outputs, gates = [], []
    for t in range(num_loops):
        ran = t <= cols.kv_exit  # [B, S] columns whose loop-t K/V is real for the others
        replace, fill, project_from = None, frozen, None
        if kv_sharing != "none":
            replace, fill = cols.decoded, shared
        elif t > 0 and skipped_kv != "compute":
            replace = ~ran
            project_from = h_out if skipped_kv == "project" else None
        h, (k, v) = _layers(graphdef, stacked, h, cos, sin, cols.valid, replace, fill, project_from)
        h = model.norm(h)
        h_out = jnp.where((t <= cols.exit_index)[:, :, None], h, h_out)
        outputs.append(readout(h_out))
        gates.append(model.gate_logit(h_out))
        ran_kv = ran[None, :, :, None, None]
        frozen = tuple(jnp.where(ran_kv, new, old) for new, old in zip((k, v), frozen, strict=True))
        total = tuple(acc + jnp.where(ran_kv, new.astype(jnp.float32), 0.0)
                      for new, acc in zip((k, v), total, strict=True))
    new_shared = None
    if kv_sharing == "last":
        new_shared = frozen
    elif kv_sharing == "average":
        count = (cols.kv_exit + 1).astype(jnp.float32)[None, :, :, None, None]
        new_shared = tuple((acc / count).astype(h.dtype) for acc in total)
    return jax.tree.map(lambda *x: jnp.stack(x), *outputs), jnp.stack(gates), new_shared


def replay_loop(model, cols: Columns, readout: Callable[[jax.Array], Any], *, skipped_kv: str = "project",
                kv_sharing: str = "none", num_loops: int | None = None) -> tuple[Any, jax.Array]:
    """The replayed forward: `readout(h [B, S, D])` of every column's state after each loop, frozen after
    its exit (so loop T - 1's readout is the exit loop's) -> (readouts stacked on a leading T axis,
    gate_logits [T, B, S] float32, likewise frozen). Traceable (jit it with the model split)."""
    if skipped_kv not in SKIPPED_KV or kv_sharing not in SHARING:
        raise ValueError(f"need skipped_kv in {SKIPPED_KV} and kv_sharing in {SHARING}, got "
                         f"{skipped_kv!r}, {kv_sharing!r}")
    num_loops = model.config.total_ut_steps if num_loops is None else num_loops
    run = lambda shared: _one_pass(model, cols, readout, skipped_kv, kv_sharing, num_loops, shared)
    if kv_sharing == "none":
        return run(None)[:2]
    cfg = model.config
    zeros = jnp.zeros((cfg.num_hidden_layers, *cols.ids.shape, cfg.num_key_value_heads, cfg.head_dim),
                      cfg.compute_jnp_dtype)
    graphdef, state = nnx.split(model)
    constant = nnx.merge(graphdef, jax.tree.map(jax.lax.stop_gradient, state))  # no tangents in the loop
    entries = lambda shared: _one_pass(constant, cols, lambda h: None, skipped_kv, kv_sharing, num_loops,
                                       shared)[2]

    def changed(carry):
        passes, old, new = carry
        unequal = jnp.any(jnp.stack([jnp.any(a != b) for a, b in zip(old, new, strict=True)]))
        return unequal & (passes <= cols.ids.shape[1])

    def iterate(carry):
        passes, _, new = carry
        return passes + 1, new, entries(new)

    start = (zeros, zeros)
    _, _, shared = jax.lax.while_loop(changed, iterate, (jnp.int32(1), start, entries(start)))
    return run(shared)[:2]


def token_logprobs(logits: jax.Array, targets: jax.Array, temperature: float | jax.Array) -> jax.Array:
    """log softmax(logits / temperature)[target] in float32: logits [..., V], targets [...] -> [...]
    (the distribution `generate` samples from with top_k = None and top_p = None)."""
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    return jnp.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Replayed:
    """Per generated token ([B, M]; loop axis first where there is one): logprobs at the exit loop,
    loop_logprobs [T, B, M] of the frozen state after each loop, gate_logits [T, B, M] likewise,
    exit_logprobs log p(e) of the recorded exit under the gate's exit distribution."""

    logprobs: jax.Array
    loop_logprobs: jax.Array
    gate_logits: jax.Array
    exit_logprobs: jax.Array


def replay(model, cols: Columns, prompt_width: int, temperature: float | jax.Array = 1.0, *,
           skipped_kv: str = "project", kv_sharing: str = "none", num_loops: int | None = None) -> Replayed:
    """Token log-probs of a rollout under its recorded exits (`replay_loop` with a log-prob readout)."""
    per_loop, gates = replay_loop(
        model, cols, lambda h: token_logprobs(model.logits(h), cols.targets, temperature),
        skipped_kv=skipped_kv, kv_sharing=kv_sharing, num_loops=num_loops)
    per_loop, gates = generated(per_loop, prompt_width), generated(gates, prompt_width)
    exit_index = generated(cols.exit_index, prompt_width)
    return Replayed(logprobs=per_loop[-1], loop_logprobs=per_loop, gate_logits=gates,
                    exit_logprobs=exits.select_loop(exits.log_exit_pdf(gates), exit_index))


@functools.partial(nnx.jit, static_argnames=("prompt_width", "skipped_kv", "kv_sharing", "num_loops"))
def replay_jit(model, cols: Columns, prompt_width: int, temperature, *, skipped_kv: str = "project",
               kv_sharing: str = "none", num_loops: int | None = None) -> Replayed:
    """`replay`, jitted (compiled once per shape and setting)."""
    return replay(model, cols, prompt_width, temperature, skipped_kv=skipped_kv, kv_sharing=kv_sharing,
                  num_loops=num_loops)


@functools.partial(nnx.jit, static_argnames=("prompt_width", "num_loops"))
def fixed_depth_logprobs(model, cols: Columns, prompt_width: int, temperature,
                         num_loops: int | None = None) -> tuple[jax.Array, jax.Array]:
    """What a fixed-depth trainer scores for the same tokens, ignoring the recorded exits: every column
    runs all loops -> (the last loop's log-probs [B, M] (what ouro_rl trains), the exit mixture's
    log sum_t p(t) softmax(z_t / temperature)[y] [B, M])."""
    num_loops = model.config.total_ut_steps if num_loops is None else num_loops
    full = jnp.full_like(cols.exit_index, num_loops - 1)
    out = replay(model, dataclasses.replace(cols, exit_index=full, kv_exit=full), prompt_width, temperature,
                 skipped_kv="compute", num_loops=num_loops)
    mixture = jax.nn.logsumexp(exits.log_exit_pdf(out.gate_logits) + out.loop_logprobs, axis=0)
    return out.logprobs, mixture
