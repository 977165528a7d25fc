"""Per-loop measurements of a trained run on its held-out stream (arXiv:2510.25741 §5.4: every loop's
LM head read out; Q-exit on the exit distribution's CDF).

`measure(run_dir, config)` reloads the run's latest parameters, reads `num_batches` held-out batches of
its task and returns plain floats and lists (T = the run's loops, loops 1-based in names):

  answer_accuracy [T]        rows whose every answer position is right (exact match), per loop
  answer_token_accuracy [T]  answer positions right, per loop
  answer_ce [T]              mean CE (nats) at the answer positions, per loop
  loss [T]                   mean CE over all loss positions, per loop (deeper-is-better reads this)
  deeper_is_better           loss[t+1] <= loss[t] for every t
  exit_pdf [T], mean_exit_loop, entropy   the exit distribution over the loss positions
  q_exit                     [{q, mean_depth, accuracy}]: exit at the first loop whose CDF >= q, read at
                             each row's last answer position (mean_depth in loops)
  accuracy_by_difficulty     {h: [T]} for mixed-difficulty p-hop (h = the row's hop count)
  bits, bits_per_param [T]   for the facts task: F (log2 V - answer CE in bits), clipped at 0
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

import ouro_jax
from ouro_jax.data import pipeline
from ouro_jax.data.tasks import Facts

Q_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


def _per_loop_fn(graphdef):
    """Jitted (state, batch) -> (ce [T, B, S] float32, correct [T, B, S] bool, gate_logits [T, B, S])."""

    @jax.jit
    def per_loop(state, batch):
        model = nnx.merge(graphdef, state)
        out = model(batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"])
        logits = out.logits.astype(jnp.float32)
        targets = jnp.broadcast_to(batch["targets"], logits.shape[:-1])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return ce, jnp.argmax(logits, axis=-1) == targets, out.gate_logits.astype(jnp.float32)

    return per_loop


def difficulty(config: ml_collections.ConfigDict, batch: dict[str, np.ndarray]) -> np.ndarray | None:
    """Each row's hop count for mixed-difficulty p-hop (from its hop-count token), else None. [B]"""
    data = config.data
    if data.source != "phop" or not data.phop.p_min:
        return None
    return batch["input_ids"][:, 0] - data.phop.alphabet + 1


def evaluate_batches(model: ouro_jax.Ouro, batches, config) -> dict[str, np.ndarray]:
    """Per-row and per-loop arrays over `batches` (numpy, concatenated over rows):

    row_correct [T, R] (exact match over the row's answer positions), has_answer [R],
    answer_gate [T, R] (gate logits at the row's last answer position), answer_last_correct [T, R],
    sums over positions: loss_sum [T], loss_count, answer_ce_sum [T], answer_correct_sum [T], answer_count,
    pdf_sum [T], entropy_sum, exit_loop_sum; difficulty [R] (or absent).
    """
    graphdef, state = nnx.split(model)
    per_loop = _per_loop_fn(graphdef)
    acc: dict[str, list] = {}
    sums: dict[str, np.ndarray | float] = {}

    def add(name, value):
        sums[name] = sums.get(name, 0.0) + value

    for batch in batches:
        ce, correct, gate = (np.asarray(x) for x in per_loop(state, jax.tree.map(jnp.asarray, batch)))
        loss_mask = batch["loss_mask"].astype(bool)
        answers = batch["answer_mask"].astype(bool)
        has_answer = answers.any(axis=-1)
        last = answers.shape[-1] - 1 - np.argmax(answers[:, ::-1], axis=-1)  # last answer position per row
        rows = np.arange(answers.shape[0])
        acc.setdefault("row_correct", []).append(np.all(correct | ~answers, axis=-1) & has_answer)
        acc.setdefault("has_answer", []).append(has_answer)
        acc.setdefault("answer_gate", []).append(gate[:, rows, last])
        acc.setdefault("answer_last_correct", []).append(correct[:, rows, last])
        level = difficulty(config, batch)
        if level is not None:
            acc.setdefault("difficulty", []).append(level)
        add("loss_sum", (ce * loss_mask).sum(axis=(1, 2)))
        add("loss_count", float(loss_mask.sum()))
        add("answer_ce_sum", (ce * answers).sum(axis=(1, 2)))
        add("answer_correct_sum", (correct & answers).sum(axis=(1, 2)).astype(np.float64))
        add("answer_count", float(answers.sum()))
        pdf = ouro_jax.exits.exit_pdf(jnp.asarray(gate))
        add("pdf_sum", (np.asarray(pdf) * loss_mask).sum(axis=(1, 2)))
        entropy = np.asarray(ouro_jax.exits.exit_entropy(jnp.asarray(gate)))
        add("entropy_sum", float((entropy * loss_mask).sum()))
        add("exit_loop_sum", float((np.asarray(ouro_jax.exits.expected_exit_loop(pdf)) * loss_mask).sum()))
    out = {k: np.concatenate(v, axis=-1) for k, v in acc.items()}
    return {**out, **sums}


def summarise(arrays: dict[str, np.ndarray], config: ml_collections.ConfigDict,
              num_params: int) -> dict:
    """The measurements of the module docstring from `evaluate_batches`' arrays."""
    has = arrays["has_answer"]
    n_rows = max(int(has.sum()), 1)
    loss = arrays["loss_sum"] / max(arrays["loss_count"], 1.0)
    answer_ce = arrays["answer_ce_sum"] / max(arrays["answer_count"], 1.0)
    result = {
        "answer_accuracy": (arrays["row_correct"].sum(axis=1) / n_rows).tolist(),
        "answer_token_accuracy": (arrays["answer_correct_sum"] / max(arrays["answer_count"], 1.0)).tolist(),
        "answer_ce": answer_ce.tolist(),
        "loss": loss.tolist(),
        "deeper_is_better": bool(np.all(np.diff(loss) <= 0)),
        "exit_pdf": (arrays["pdf_sum"] / max(arrays["loss_count"], 1.0)).tolist(),
        "mean_exit_loop": arrays["exit_loop_sum"] / max(arrays["loss_count"], 1.0),
        "entropy": arrays["entropy_sum"] / max(arrays["loss_count"], 1.0),
        "num_rows": int(has.sum()),
        "params": num_params,
    }
    gate, right = arrays["answer_gate"][:, has], arrays["answer_last_correct"][:, has]
    result["q_exit"] = []
    for q in Q_GRID:
        loops = (np.asarray(ouro_jax.exits.q_exit_loop(jnp.asarray(gate), q)) if len(gate) > 1
                 else np.zeros(gate.shape[1], np.int64))  # 0-based [rows]; one loop: no choice
        result["q_exit"].append({"q": q, "mean_depth": float(np.mean(loops + 1)),
                                 "accuracy": float(np.mean(right[loops, np.arange(loops.size)]))})
    if "difficulty" in arrays:
        level = arrays["difficulty"]
        result["accuracy_by_difficulty"] = {
            str(h): arrays["row_correct"][:, has & (level == h)].mean(axis=1).tolist()
            for h in np.unique(level[has])}
    if config.data.source == "facts":
        facts = Facts(n=config.data.seq_len, **config.data.facts.to_dict())
        bits = facts.num_facts * np.maximum(0.0, math.log2(facts.values) - answer_ce / math.log(2))
        result["bits"] = bits.tolist()
        result["bits_per_param"] = (bits / num_params).tolist()
    return result


def eval_batches_needed(config: ml_collections.ConfigDict, default: int) -> int:
    """Held-out batches to measure: `default`, or for the facts task enough to cover every fact once
    (stream 1 enumerates the facts; raises if the batch does not tile the facts)."""
    if config.data.source != "facts":
        return default
    facts = Facts(n=config.data.seq_len, **config.data.facts.to_dict())
    per_batch = config.data.batch_size * facts.facts_per_row
    if facts.num_facts % per_batch:
        raise ValueError(f"facts: {facts.num_facts} facts do not tile batches of {per_batch} facts "
                         f"(data.batch_size x seq_len // 4)")
    return facts.num_facts // per_batch


def measure(run_dir: str, config: ml_collections.ConfigDict, *, num_batches: int = 32) -> dict:
    """Reload the run's latest parameters and measure them on its held-out stream (module docstring)."""
    model = ouro_jax.from_pretrained(run_dir)
    batches = pipeline.build_eval_batches(config.data, seed=config.seed,
                                          num_batches=eval_batches_needed(config, num_batches))
    return summarise(evaluate_batches(model, batches, config), config, ouro_jax.num_params(model))
