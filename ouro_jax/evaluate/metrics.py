"""Per-loop evaluation of an Ouro model and of its exit rules (arXiv:2510.25741 §5.4.1, Fig. 5).

One jitted function per (batch shape, loop count) runs the model's loop once per batch, reading after
every loop l (0-based; loop l + 1 for users) each token's cross-entropy and whether its argmax is the target,
its normed state h_l and its gate logit: `objective.per_loop_losses`, the readout training's evaluation
uses too (LM head in chunks of positions). From these it sums, over the tokens with `loss_mask` (and the
answers with `answer_mask`):

  per loop      CE, correct tokens, correct answers, the exit pdf p(l);
  exit pdf      expected exit loop sum_l (l + 1) p(l), its entropy and the pdf-weighted CE;
  per rule      for every rule of `policies.Grid` (Q-exit q, hidden-state thresholds) the CE, correct
                tokens and answers, and depth (loops used) at each token's exit loop, and the histogram
                of exit loops.

Only one chunk of one loop's logits exists at a time. Batches must share one shape (the pipeline pads the
last one with empty rows whose masks are 0), so a whole evaluation compiles once. `summarize` turns the
summed statistics into means: `ce_per_loop`, `accuracy_per_loop`, `answer_accuracy_per_loop`,
`exit_pdf_per_loop` (the names of the training evaluation), perplexities, and one record per rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from ouro_jax import objective
from ouro_jax.evaluate import policies
from ouro_jax.model import exits
from ouro_jax.model.ouro import Ouro

Batch = Mapping[str, Any]
MODEL_KEYS = ("input_ids", "targets", "loss_mask", "answer_mask", "segment_ids", "positions")


def _sums_at(exit_loops: jax.Array, per_loop: jax.Array, weight: jax.Array) -> jax.Array:
    """sum over tokens of weight * per_loop[exit loop]: exit_loops [P, B, S], per_loop [L, B, S],
    weight [B, S] -> [P]."""
    picked = jnp.take_along_axis(per_loop[None], exit_loops[:, None], axis=1)[:, 0]  # [P, B, S]
    return jnp.sum(picked * weight, axis=(1, 2))


def batch_sums(model: Ouro, batch: Batch, q: jax.Array, hidden_delta: jax.Array,
               hidden_delta_relative: jax.Array, *,
               num_loops: int) -> dict[str, jax.Array]:
    """Summed statistics of one batch (see the module docstring); every value float32.

    Keys: num_tokens, num_answers; ce_per_loop, correct_per_loop, answer_correct_per_loop,
    exit_pdf_per_loop [L]; expected_exit_loop, entropy, weighted_ce []; and for the P swept rules
    rule_ce, rule_correct, rule_depth, rule_answer_correct, rule_answer_depth [P], rule_histogram [P, L].
    """
    ce, correct, gate_logits, hidden = objective.per_loop_losses(model, batch, num_loops=num_loops,
                                                                 keep_hidden=True)
    correct = correct.astype(jnp.float32)
    mask = batch["loss_mask"].astype(jnp.float32)
    answers = batch["answer_mask"].astype(jnp.float32)
    pdf = exits.exit_pdf(gate_logits)
    per_token = lambda x, w: jnp.sum(x * w, axis=(-2, -1))
    loops = policies.sweep_exit_loops(gate_logits, hidden, q, hidden_delta,
                                      hidden_delta_relative)  # [P, B, S]
    depth = (loops + 1).astype(jnp.float32)
    return {
        "num_tokens": jnp.sum(mask),
        "num_answers": jnp.sum(answers),
        "ce_per_loop": per_token(ce, mask),
        "correct_per_loop": per_token(correct, mask),
        "answer_correct_per_loop": per_token(correct, answers),
        "exit_pdf_per_loop": per_token(pdf, mask),
        "expected_exit_loop": per_token(exits.expected_exit_loop(pdf), mask),
        "entropy": per_token(exits.exit_entropy(gate_logits), mask),
        "weighted_ce": per_token(jnp.sum(pdf * ce, axis=0), mask),
        "rule_ce": _sums_at(loops, ce, mask),
        "rule_correct": _sums_at(loops, correct, mask),
        "rule_depth": per_token(depth, mask),
        "rule_answer_correct": _sums_at(loops, correct, answers),
        "rule_answer_depth": per_token(depth, answers),
        "rule_histogram": jnp.sum(jax.nn.one_hot(loops, num_loops) * mask[..., None], axis=(1, 2)),
    }


def make_batch_fn(model: Ouro, num_loops: int) -> Callable[..., dict[str, jax.Array]]:
    """`fn(params, batch, q, hidden_delta, hidden_delta_relative) -> batch_sums(...)`, jitted once for the
    model's graph and `num_loops`; params = `nnx.split(model)[1]`."""
    graphdef = nnx.graphdef(model)

    def fn(params, batch, q, hidden_delta, hidden_delta_relative):
        return batch_sums(nnx.merge(graphdef, params), batch, q, hidden_delta, hidden_delta_relative,
                          num_loops=num_loops)

    return jax.jit(fn)


def evaluate(model: Ouro, batches: Sequence[Batch], grid: policies.Grid, *, num_loops: int | None = None,
             progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Evaluate `model` on `batches` (dicts of same-shape [B, S] arrays with `MODEL_KEYS`) with
    `num_loops` loops (default: the trained T); `progress(batches_done)` is called after each batch.
    Returns `summarize`'s dict.

    In a multi-process run every process holds the same `batches` and evaluates every
    `jax.process_count()`-th one, from its `jax.process_index()`, on its first local device; the
    per-batch sums are then added across processes, so every process returns the one-process result.
    The model must be addressable from every process (e.g. loaded by each, as `from_pretrained` does).
    """
    trained = model.config.total_ut_steps
    num_loops = trained if num_loops is None else num_loops
    if num_loops < 1:
        raise ValueError(f"num_loops={num_loops} must be >= 1")
    if not batches:
        raise ValueError("the evaluation data has no batches")
    fn = make_batch_fn(model, num_loops)
    device = jax.local_devices()[0]
    params = jax.device_put(nnx.state(model), device)
    thresholds = jax.device_put(grid.arrays(), device)
    put = lambda batch: {k: jax.device_put(np.asarray(batch[k]), device) for k in MODEL_KEYS}
    first = {k: np.asarray(batches[0][k]) for k in MODEL_KEYS}
    shapes = jax.eval_shape(fn, params, first, *thresholds)
    totals = {key: np.zeros(x.shape, np.float64) for key, x in shapes.items()}
    for done, i in enumerate(process_share(len(batches)), start=1):
        for key, value in jax.device_get(fn(params, put(batches[i]), *thresholds)).items():
            totals[key] += np.asarray(value, np.float64)
        if progress is not None:
            progress(done)
    if jax.process_count() > 1:
        totals = _sum_over_processes(totals)
    if totals["num_tokens"] == 0:
        raise ValueError("the evaluation data has no scored tokens")
    return summarize(totals, grid, trained_loops=trained)


def process_share(num_batches: int) -> range:
    """The indices of the batches this process evaluates: every `jax.process_count()`-th one."""
    return range(jax.process_index(), num_batches, jax.process_count())


def _sum_over_processes(totals: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every process's float64 `totals` added up, on every process. JAX without x64 moves float32, so each
    value travels as two float32s (its rounding and the remainder): the sum keeps ~48 bits."""
    high = {k: v.astype(np.float32) for k, v in totals.items()}
    low = {k: (v - high[k]).astype(np.float32) for k, v in totals.items()}
    gathered = multihost_utils.process_allgather((high, low))  # each leaf [processes, ...]
    return {k: (gathered[0][k].astype(np.float64) + gathered[1][k].astype(np.float64)).sum(0) for k in totals}


def _perplexity(ce: float) -> float:
    return math.exp(min(ce, 700.0))


def summarize(totals: Mapping[str, np.ndarray], grid: policies.Grid, *, trained_loops: int) -> dict[str, Any]:
    """Summed statistics (`batch_sums` over all batches, float64) -> JSON-ready means.

    Per-loop lists have one entry per loop 1..L; `answer_*` entries are None when the data has no answers.
    `rules` lists the static exits (loop 1..L) and then the swept rules, each with its label, mean depth
    (loops per token), CE, perplexity, token accuracy, answer accuracy, mean depth over answers and the
    fraction of tokens exiting at each loop.
    """
    tokens, answers = float(totals["num_tokens"]), float(totals["num_answers"])
    per_tok = lambda key: (np.asarray(totals[key]) / tokens).tolist()
    per_ans = lambda key: (np.asarray(totals[key]) / answers).tolist() if answers else None
    ce = per_tok("ce_per_loop")
    num_loops = len(ce)
    accuracy, answer_accuracy = per_tok("correct_per_loop"), per_ans("answer_correct_per_loop")
    rules = [_rule("static", t, t, ce[t - 1], accuracy[t - 1],
                   answer_accuracy[t - 1] if answers else None, t if answers else None,
                   np.eye(num_loops)[t - 1].tolist()) for t in range(1, num_loops + 1)]
    histogram = np.asarray(totals["rule_histogram"]) / tokens
    for p, (kind, threshold) in enumerate(grid.rules()):
        rules.append(_rule(
            kind, threshold, totals["rule_depth"][p] / tokens, totals["rule_ce"][p] / tokens,
            totals["rule_correct"][p] / tokens,
            totals["rule_answer_correct"][p] / answers if answers else None,
            totals["rule_answer_depth"][p] / answers if answers else None, histogram[p].tolist()))
    return {
        "num_loops": num_loops, "trained_loops": trained_loops,
        "num_tokens": tokens, "num_answers": answers,
        "ce_per_loop": ce,
        "perplexity_per_loop": [_perplexity(x) for x in ce],
        "accuracy_per_loop": accuracy,
        "answer_accuracy_per_loop": answer_accuracy,
        "exit_pdf_per_loop": per_tok("exit_pdf_per_loop"),
        "mean_exit_loop": float(totals["expected_exit_loop"]) / tokens,
        "entropy": float(totals["entropy"]) / tokens,
        "weighted_ce": float(totals["weighted_ce"]) / tokens,
        "rules": rules,
    }


def _rule(kind, threshold, depth, ce, accuracy, answer_accuracy, answer_depth, histogram) -> dict[str, Any]:
    as_float = lambda x: None if x is None else float(x)
    return {"kind": kind, "threshold": float(threshold), "label": policies.label(kind, threshold),
            "mean_depth": float(depth), "ce": float(ce), "perplexity": _perplexity(float(ce)),
            "accuracy": float(accuracy), "answer_accuracy": as_float(answer_accuracy),
            "answer_mean_depth": as_float(answer_depth), "exit_histogram": histogram}


def markdown_table(result: Mapping[str, Any]) -> str:
    """One markdown table: a row per static exit (loop t, with the gate's mean probability of exiting at
    t) and per swept rule; loops past the trained T are marked `(extrapolated)`. The answer columns
    (accuracy and mean depth over the task answers) appear when the data has answers."""
    has_answers = result["answer_accuracy_per_loop"] is not None
    columns = ["exit rule", "mean depth", "CE", "perplexity", "token acc."]
    columns += ["answer acc.", "answer depth"] if has_answers else []
    columns += ["gate p(exit)"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for rule in result["rules"]:
        name, pdf = rule["label"], ""
        if rule["kind"] == "static":
            t = int(rule["threshold"])
            pdf = f"{result['exit_pdf_per_loop'][t - 1]:.3f}"
            name += " (extrapolated)" if t > result["trained_loops"] else ""
        cells = [name, f"{rule['mean_depth']:.2f}", f"{rule['ce']:.4f}", f"{rule['perplexity']:.3f}",
                 f"{100 * rule['accuracy']:.2f}%"]
        if has_answers:
            cells += [f"{100 * rule['answer_accuracy']:.2f}%", f"{rule['answer_mean_depth']:.2f}"]
        lines.append("| " + " | ".join([*cells, pdf]) + " |")
    return "\n".join(lines)
