"""Training objectives of Ouro (arXiv:2510.25741 §3.3-3.4) and the per-loop metrics looped models need.

A batch is a dict of [B, S] arrays: `input_ids`, `targets` (the next token at each position),
optional `loss_mask` (1 where the target counts), `segment_ids` and `positions` (packed rows).

Stage I   L = sum_t p(t|x) CE_t - beta H(p(.|x)), per token, masked token-mean (§3.3, Eq. 4).
          `weighting="last_loop"` trains only CE_T instead (the plain deep-model baseline; no gate loss).
          `weighting="logit_mixture"` trains CE(sum_t p(t|x) z_t) instead, the loss of the released
          modeling code given `labels` (what an HF-Trainer fine-tune optimises; no entropy term).
Stage II  gate-only BCE of the continuation probability 1 - lambda_t against
          w_t = sigmoid(k (max(0, CE_{t-1} - CE_t) - gamma)), per-loop losses detached, summed over
          t = 2..T and divided by T as printed (§3.4, Eq. 6); the LM receives no gradient.

Both compute each loop's cross-entropy inside the loop with the LM head recomputed in the backward
pass, in chunks of `CE_CHUNK` positions, so at most one chunk of one loop's [B, CE_CHUNK, V] float32
logits is alive at a time. T is the number of loops.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ouro_jax.model import exits
from ouro_jax.model.ouro import Ouro

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


CE_CHUNK = 1024  # positions per LM-head chunk (the whole row when S is shorter or not a multiple)


def _token_ce_and_correct(model: Ouro, targets: jax.Array, keep_hidden: bool):
    """A `readout` for `Ouro.loop`: hidden [B, S, D] -> (CE [B, S] float32, argmax == target [B, S],
    hidden or None), the CE computed over chunks of `CE_CHUNK` positions, each recomputed in the
    backward pass."""

    def chunk(hidden, targets):  # [B, C, D], [B, C]
        logits = model.logits(hidden)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return ce, jnp.argmax(logits, axis=-1) == targets

    def readout(hidden):
        kept = hidden if keep_hidden else None
        b, s = hidden.shape[:2]
        if s <= CE_CHUNK or s % CE_CHUNK:
            return (*chunk(hidden, targets), kept)
        split = lambda x: x.reshape(b, s // CE_CHUNK, CE_CHUNK, *x.shape[2:]).swapaxes(0, 1)
        ce, correct = jax.lax.map(jax.checkpoint(lambda xs: chunk(*xs)), (split(hidden), split(targets)))
        join = lambda x: x.swapaxes(0, 1).reshape(b, s)
        return join(ce), join(correct), kept

    return readout


class LoopReadout(NamedTuple):
    """What every loop's LM head and gate say about a batch (T loops run)."""

    ce: jax.Array  # [T, B, S] float32 cross-entropy of each loop's logits against `targets`
    correct: jax.Array  # [T, B, S] bool: the loop's argmax is the target
    gate_logits: jax.Array  # [T, B, S] float32
    hidden: jax.Array | None  # [T, B, S, D] each loop's normed state (`keep_hidden`), else None


def per_loop_losses(model: Ouro, batch: Batch, *, num_loops: int | None = None,
                    detach_gate_input: bool = False, keep_hidden: bool = False) -> LoopReadout:
    """Per-token CE and correctness of every loop without holding T loops of logits: the one per-loop
    readout of training (losses, evaluation during training) and `python -m ouro_jax.evaluate`."""
    (ce, correct, hidden), gate_logits = model.loop(
        batch["input_ids"], _token_ce_and_correct(model, batch["targets"], keep_hidden),
        positions=batch.get("positions"), segment_ids=batch.get("segment_ids"),
        num_loops=num_loops, remat_readout=True, detach_gate_input=detach_gate_input)
    return LoopReadout(ce, correct, gate_logits, hidden)


def _mask(batch: Batch) -> jax.Array:
    mask = batch.get("loss_mask")
    return jnp.ones(batch["targets"].shape, jnp.float32) if mask is None else mask.astype(jnp.float32)


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of x [..., B, S] over the masked tokens of the last two axes."""
    return jnp.sum(x * mask, axis=(-2, -1)) / jnp.maximum(jnp.sum(mask), 1.0)


def loop_metrics(ce, correct, gate_logits, mask) -> Metrics:
    """Per-loop diagnostics, all float32.

    ce_per_loop [T] (masked mean CE of each loop's LM head), accuracy_per_loop [T],
    exit_pdf_per_loop [T] (mean exit probability of each loop), weighted_ce (mean sum_t p(t) CE_t, the
    expected CE under the exit distribution), entropy (mean H(p)), mean_exit_loop (mean of
    sum_t t p(t), loops counted from 1), num_tokens.
    """
    pdf = exits.exit_pdf(gate_logits)
    return {
        "ce_per_loop": _masked_mean(ce, mask),
        "accuracy_per_loop": _masked_mean(correct.astype(jnp.float32), mask),
        "exit_pdf_per_loop": _masked_mean(pdf, mask),
        "weighted_ce": _masked_mean(jnp.sum(pdf * ce, axis=0), mask),
        "entropy": _masked_mean(exits.exit_entropy(gate_logits), mask),
        "mean_exit_loop": _masked_mean(exits.expected_exit_loop(pdf), mask),
        "num_tokens": jnp.sum(mask),
    }


def stage1_token_loss(ce: jax.Array, gate_logits: jax.Array, beta: float) -> jax.Array:
    """sum_t p(t) CE_t - beta H(p) per token. ce, gate_logits [T, B, S] -> [B, S] float32."""
    pdf = exits.exit_pdf(gate_logits)
    return jnp.sum(pdf * ce, axis=0) - beta * exits.exit_entropy(gate_logits)


WEIGHTINGS = ("exit_pdf", "last_loop", "logit_mixture")


def stage1_loss(model: Ouro, batch: Batch, *, beta: float = 0.1, weighting: str = "exit_pdf",
                num_loops: int | None = None) -> tuple[jax.Array, Metrics]:
    """Stage I: exit-pdf-weighted per-loop CE minus beta * entropy, masked token mean.

    weighting="last_loop" is the baseline that trains only the last loop's CE (beta unused)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r} must be one of {WEIGHTINGS}")
    if weighting == "logit_mixture":
        return logit_mixture_loss(model, batch, num_loops=num_loops)
    ce, correct, gate_logits, _ = per_loop_losses(model, batch, num_loops=num_loops)
    mask = _mask(batch)
    token_loss = stage1_token_loss(ce, gate_logits, beta) if weighting == "exit_pdf" else ce[-1]
    loss = _masked_mean(token_loss, mask)
    return loss, {"loss": loss, **loop_metrics(ce, correct, gate_logits, mask)}


def logit_mixture_loss(model: Ouro, batch: Batch, *, num_loops: int | None = None
                       ) -> tuple[jax.Array, Metrics]:
    """Masked token-mean CE of the exit-pdf-weighted mixture of logits, sum_t p(t) z_t.

    The LM head is linear, so sum_t p(t) W h_t = W (sum_t p(t) h_t): the mixture's logits are the head
    applied to the pdf-weighted mix of the T normed states [B, S, D], read chunk by chunk as in Stage I."""
    ce, correct, gate_logits, hidden = per_loop_losses(model, batch, num_loops=num_loops, keep_hidden=True)
    pdf = exits.exit_pdf(gate_logits)
    mixed = jnp.einsum("tbs,tbsd->bsd", pdf, hidden.astype(jnp.float32)).astype(hidden.dtype)
    mask = _mask(batch)
    loss = _masked_mean(_token_ce_and_correct(model, batch["targets"], keep_hidden=False)(mixed)[0], mask)
    return loss, {"loss": loss, **loop_metrics(ce, correct, gate_logits, mask)}


def stage2_token_loss(ce: jax.Array, gate_logits: jax.Array, *, k: float = 50.0,
                      gamma: float = 0.005, pairing: str = "printed") -> jax.Array:
    """Gate BCE per loop and token. ce, gate_logits [T, B, S] -> [T-1, B, S] float32.

    Improvement I_t = max(0, CE_{t-1} - CE_t) (CE detached), continuation target
    w_t = sigmoid(k (I_t - gamma)), predicted continuation 1 - lambda. `pairing="printed"` supervises
    the gate of loop t (t = 2..T) with I_t, as the paper prints it; `pairing="next"` supervises the
    gate of loop t (t = 1..T-1) with I_{t+1}, the improvement that continuing would bring.
    """
    ce = jax.lax.stop_gradient(ce.astype(jnp.float32))
    improvement = jnp.maximum(0.0, ce[:-1] - ce[1:])  # I_2..I_T
    w = jax.nn.sigmoid(k * (improvement - gamma))
    if pairing == "printed":
        g = gate_logits[1:]
    elif pairing == "next":
        g = gate_logits[:-1]
    else:
        raise ValueError(f"pairing={pairing!r} must be 'printed' or 'next'")
    # log(1 - lambda) = log_sigmoid(-g), log(lambda) = log_sigmoid(g)
    return -(w * jax.nn.log_sigmoid(-g) + (1.0 - w) * jax.nn.log_sigmoid(g))


def stage2_loss(model: Ouro, batch: Batch, *, k: float = 50.0, gamma: float = 0.005,
                pairing: str = "printed", num_loops: int | None = None) -> tuple[jax.Array, Metrics]:
    """Stage II: (1/T) sum_{t=2..T} masked-mean BCE of the gate; gradients reach only the gate."""
    ce, correct, gate_logits, _ = per_loop_losses(model, batch, num_loops=num_loops,
                                                  detach_gate_input=True)
    mask = _mask(batch)
    bce = stage2_token_loss(ce, gate_logits, k=k, gamma=gamma, pairing=pairing)
    loss = jnp.sum(_masked_mean(bce, mask)) / ce.shape[0]
    return loss, {"loss": loss, **loop_metrics(ce, correct, gate_logits, mask)}


def loss_fn(model: Ouro, batch: Batch, objective: dict[str, Any]) -> tuple[jax.Array, Metrics]:
    """Dispatch on `objective["stage"]` (1 or 2) with the remaining keys as keyword arguments."""
    kwargs = dict(objective)
    stage = kwargs.pop("stage", 1)
    if stage == 1:
        return stage1_loss(model, batch, **kwargs)
    if stage == 2:
        return stage2_loss(model, batch, **kwargs)
    raise ValueError(f"objective stage={stage!r} must be 1 or 2")
