"""The on-policy RL loop: `train(config, workdir)` (`python -m ouro_jax.rl`).

Each step: P prompts of the task's training stream (examples step * P .. step * P + P - 1, a pure function
of the step, so resuming needs no data-iterator state) -> G rollouts each with `generate` on the current
parameters (colocated: no weight copy, no staleness), per-row sampler seeds drawn from (seed, step) ->
rewards (minus `rl.depth_cost` x mean loops) -> group advantages, zero-variance groups dropped -> one
jitted update whose log-probs come from the exit replay (`replay.replay`) under the rollouts' recorded
exits -> metrics. Each token's depth is Q-exit's or full depth (replayed, not trained) or, with
`rl.exit_policy="sample"`, drawn from the gate's exit distribution: then (exit, token) is the action and
the exit's log-prob enters the loss, so the gate learns the depth. The run directory, lock,
config record and TensorBoard / metrics.jsonl are those of `python -m ouro_jax.train` (`ouro_jax.run`,
`train.metrics`); SIGTERM / SIGINT save at the step boundary and raise `loop.Interrupted`; rerunning the
command resumes from the latest checkpoint (params, optimiser state, step) and continues bit-identically.

Held-out evaluation (before the first step and every `eval_every_steps`): greedy rollouts under the same
exit policy on `eval_prompts` examples of the held-out stream: exact-match accuracy and mean loops per
token (also per hop count on mixed p-hop); `WORKDIR/summary.json` holds the base and final values.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from ouro_jax import run
from ouro_jax.data.tasks import TASKS, PHop
from ouro_jax.inference import generate, left_pad
from ouro_jax.model import exits
from ouro_jax.model.config import OuroConfig
from ouro_jax.model.ouro import Ouro
from ouro_jax.rl import losses, replay, rewards
from ouro_jax.train import metrics as metrics_lib
from ouro_jax.train.loop import Interrupted, TrainingDiverged
from ouro_jax.train.optimizer import make_optimizer

TRAIN_STREAM, HELD_OUT_STREAM = 0, 1
# how rollouts pick each token's depth: Q-exit at rl.exit_threshold (replayed, not trained), all loops,
# or drawn from the gate's exit distribution (the depth is an action: its log-prob enters the loss)
EXIT_POLICIES = ("q_exit", "full", "sample")


class ConfigError(ValueError):
    """An invalid RL config (one line)."""


def _check(condition: bool, key: str, why: str) -> None:
    if not condition:
        raise ConfigError(f"config.{key}: {why}")


def validate(c: ml_collections.ConfigDict) -> None:
    """Every user mistake in the config, before anything compiles."""
    rl = c.rl
    _check(c.total_steps >= 1, "total_steps", "must be >= 1")
    _check(c.data.source in TASKS, "data.source", f"must be one of {sorted(TASKS)} (text: not yet)")
    _check(rl.prompts_per_step >= 1 and rl.group_size >= 2, "rl.group_size",
           "need prompts_per_step >= 1 and group_size >= 2 (a group baseline needs two samples)")
    _check(rl.temperature > 0, "rl.temperature", "must be > 0 (on-policy sampling)")
    _check(rl.exit_policy in EXIT_POLICIES, "rl.exit_policy", f"must be one of {EXIT_POLICIES}")
    _check(0.0 <= rl.exit_threshold <= 1.0, "rl.exit_threshold", "must lie in [0, 1]")
    _check(rl.skipped_kv in replay.SKIPPED_KV, "rl.skipped_kv", f"must be one of {replay.SKIPPED_KV}")
    _check(rl.kv_sharing in replay.SHARING, "rl.kv_sharing", f"must be one of {replay.SHARING}")
    _check(rl.loss in losses.LOSSES, "rl.loss", f"must be one of {losses.LOSSES}")
    _check(rl.std in losses.STD_MODES, "rl.std", f"must be one of {losses.STD_MODES}")
    _check(rl.aggregation in losses.AGGREGATIONS, "rl.aggregation", f"must be one of {losses.AGGREGATIONS}")
    _check(rl.credit in losses.CREDITS, "rl.credit", f"must be one of {losses.CREDITS}")
    _check(rl.kl_coef >= 0, "rl.kl_coef", "must be >= 0")
    _check(rl.depth_cost >= 0, "rl.depth_cost", "must be >= 0")
    _check(rl.depth_cost == 0 or rl.exit_policy == "sample", "rl.depth_cost",
           "needs rl.exit_policy 'sample' (under Q-exit or full depth the depth is replayed, not trained)")
    _check(c.eval_prompts >= 1, "eval_prompts", "must be >= 1")
    _check(c.base_steps >= 0, "base_steps", "must be >= 0")
    _check(not c.base_steps or c.init_from or c.data.source == "phop", "base_steps",
           "trains the p-hop demo base (recipes.demo): needs data.source 'phop' (or give init_from)")
    rewards.get(rl.reward)


def _model(c, init_from: str | None) -> Ouro:
    """The policy's starting point: `init_from` (an HF directory or a run), else a fresh `config.model`."""
    if init_from:
        from ouro_jax.convert.pretrained import from_pretrained

        return from_pretrained(init_from)
    return Ouro(OuroConfig(**c.model.to_dict()), rngs=nnx.Rngs(c.seed))


def base_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The Stage I run that `config.base_steps` trains when no init_from is given: `recipes.demo` (a
    1-layer block looped 4 times, Stage I) for base_steps steps on the RL run's p-hop task and seed."""
    from ouro_jax.train import recipes

    base = recipes.demo(steps=c.base_steps)
    base.seed = c.seed
    base.data.seq_len = c.data.seq_len
    base.data.phop.update(c.data.phop.to_dict())
    base.model.vocab_size = _task(c, TRAIN_STREAM).vocab_size
    return base


def _init_from(c: ml_collections.ConfigDict, workdir: str, resuming: bool) -> str | None:
    """config.init_from, or with base_steps > 0 the base run WORKDIR/base, trained first (resumed if a
    kill interrupted it; not retrained once the RL run has a checkpoint); None: a fresh model."""
    if c.init_from or not c.base_steps:
        return c.init_from or None
    path = os.path.join(workdir, "base")
    if not resuming:
        from ouro_jax.train import loop

        print(f"training the Stage I base: {c.base_steps} steps in {path}", file=sys.stderr)
        loop.train(base_config(c), path)
    return path


def _task(c, stream: int):
    return TASKS[c.data.source](n=c.data.seq_len, seed=c.seed, stream=stream,
                                **c.data[c.data.source].to_dict())


def prompts(task, start: int, count: int) -> tuple[list[list[int]], list[list[int]]]:
    """Examples start .. start + count - 1 of `task` as (prompts, answers) (`rewards.task_prompts`)."""
    return rewards.task_prompts(task.batch(range(start, start + count)))


def _generate(model, c, rows, seeds, temperature):
    """Rollouts of `rows` (token lists) -> (input_ids [R, data.seq_len] left-padded, prompt_lengths,
    GenerateOutput)."""
    ids, lengths = left_pad(rows)
    ids = np.pad(ids, ((0, 0), (c.data.seq_len - ids.shape[1], 0)))  # one width: one compilation
    rl = c.rl
    out = generate(model, ids, _answer_length(c), prompt_lengths=lengths,
                   exit_threshold=rl.exit_threshold if rl.exit_policy == "q_exit" else None,
                   exit_policy="sample" if rl.exit_policy == "sample" else "gate",
                   skipped_kv=rl.skipped_kv, kv_sharing=rl.kv_sharing, temperature=temperature,
                   seed=seeds)
    return ids, lengths, out


def _answer_length(c) -> int:
    return len(prompts(_task(c, HELD_OUT_STREAM), 0, 1)[1][0])


def evaluate(model, c) -> dict[str, float]:
    """Greedy held-out exact match and mean loops per token under the run's exit policy (sampled exits
    drawn with seed 0); on mixed p-hop also per hop count h ("accuracy_hop_h", "mean_loops_hop_h")."""
    task = _task(c, HELD_OUT_STREAM)
    rows, answers = prompts(task, 0, c.eval_prompts)
    _, _, out = _generate(model, c, rows, 0, 0.0)
    correct = np.array([rewards.exact_match(t.tolist(), a) for t, a in zip(out.tokens, answers, strict=True)])
    result = {"accuracy": float(correct.mean()), "mean_loops": float(out.stats.mean_depth)}
    if isinstance(task, PHop) and task.mixed:
        hops = task.hops_of(rows)
        for h in np.unique(hops):
            loops = out.exit_loops[hops == h]
            result[f"accuracy_hop_{h}"] = float(correct[hops == h].mean())
            result[f"mean_loops_hop_{h}"] = float(loops[loops > 0].mean())
    return result


def _update_fn(graphdef, c, prompt_width: int, tx):
    """The jitted update: (params, opt_state, ref_params, cols, old_logp, old_exit_logp, advantage, mask,
    generated) -> (params, opt_state, metrics). old_logp, old_exit_logp [B, M]: the sampler's record of
    each token's and its exit's log-prob; mask [B, M]: the tokens in the loss; generated: every token.
    With sampled exits a token's action is (exit loop, token): its log-prob is the sum of the two."""
    rl = c.rl
    sampled_exits = rl.exit_policy == "sample"

    def policy_logp(out: replay.Replayed, exit_index):
        logp = out.logprobs if rl.credit == "exit" else losses.loop_credit(out.loop_logprobs, exit_index,
                                                                            rl.credit, out.gate_logits)
        return logp + out.exit_logprobs if sampled_exits else logp

    def loss_fn(params, ref_params, cols, old_logp, old_exit_logp, advantage, mask, generated):
        settings = dict(skipped_kv=rl.skipped_kv, kv_sharing=rl.kv_sharing)
        out = replay.replay(nnx.merge(graphdef, params), cols, prompt_width, rl.temperature, **settings)
        exit_index = replay.generated(cols.exit_index, prompt_width)
        logp = policy_logp(out, exit_index)
        # per-loop credit is an on-policy surrogate (RLTT): its ratio is 1 by construction
        if rl.credit != "exit":
            old = jax.lax.stop_gradient(logp)
        else:
            old = old_logp + old_exit_logp if sampled_exits else old_logp
        loss, stats = losses.policy_loss(logp, old, advantage, mask, kind=rl.loss, eps_low=rl.eps_low,
                                         eps_high=rl.eps_high, cispo_max=rl.cispo_max, how=rl.aggregation)
        # sampler vs trainer over every generated token (zero-variance groups included)
        count = jnp.maximum(jnp.sum(generated), 1.0)
        gap = jnp.abs(out.logprobs - old_logp) * generated
        stats["mismatch_max"] = jnp.max(gap)
        stats["mismatch_mean"] = jnp.sum(gap) / count
        if sampled_exits:
            exit_gap = jnp.abs(out.exit_logprobs - old_exit_logp) * generated
            stats["exit_mismatch_max"] = jnp.max(exit_gap)
            stats["exit_entropy"] = jnp.sum(exits.exit_entropy(out.gate_logits) * generated) / count
        if rl.kl_coef > 0:
            ref = replay.replay(nnx.merge(graphdef, ref_params), cols, prompt_width, rl.temperature,
                                **settings)
            kl = losses.aggregate(losses.k3_kl(out.logprobs, jax.lax.stop_gradient(ref.logprobs)), mask,
                                  rl.aggregation)
            stats["kl"] = kl
            loss = loss + rl.kl_coef * kl
        stats["loss"] = loss
        return loss, stats

    @jax.jit
    def update(params, opt_state, ref_params, cols, old_logp, old_exit_logp, advantage, mask, generated):
        grads, stats = jax.grad(loss_fn, has_aux=True)(params, ref_params, cols, old_logp, old_exit_logp,
                                                       advantage, mask, generated)
        updates, opt_state = tx.update(grads, opt_state, params)
        stats["grad_norm"] = optax.tree.norm(grads)
        return optax.apply_updates(params, updates), opt_state, stats

    return update


def _seeds(c, step: int, rows: int) -> list[int]:
    """The sampler's per-row seeds of a step: a pure function of (seed, step), so a resumed run samples
    exactly what the uninterrupted one did."""
    return np.random.default_rng([c.seed, step]).integers(0, 2**31 - 1, rows).tolist()


def rl_step(c, graphdef, params, opt_state, ref_params, update, step: int):
    """One step: rollouts, rewards (minus rl.depth_cost x each rollout's mean loops per token),
    advantages, update -> (params, opt_state, metrics dict)."""
    rl = c.rl
    p, g = rl.prompts_per_step, rl.group_size
    rows, answers = prompts(_task(c, TRAIN_STREAM), step * p, p)
    start = time.perf_counter()
    ids, lengths, out = _generate(nnx.merge(graphdef, params), c, [r for r in rows for _ in range(g)],
                                  _seeds(c, step, p * g), rl.temperature)
    rollout_s = time.perf_counter() - start
    reward_fn = rewards.get(rl.reward)
    r = np.array([reward_fn(t.tolist(), answers[i // g]) for i, t in enumerate(out.tokens)], np.float32)
    generated = out.exit_loops > 0
    shaped = losses.depth_cost(jnp.asarray(r), jnp.asarray(out.exit_loops, jnp.float32),
                               jnp.asarray(generated, jnp.float32), rl.depth_cost).reshape(p, g)
    keep = ~np.asarray(losses.zero_variance(shaped))
    advantage = np.asarray(losses.advantages(shaped, rl.std)).reshape(-1)
    mask = generated & np.repeat(keep, g)[:, None]
    cols = replay.columns(ids, lengths, out.tokens, out.exit_loops, nnx.merge(graphdef, params).config
                          .total_ut_steps)
    start = time.perf_counter()
    params, opt_state, stats = update(params, opt_state, ref_params, cols, jnp.asarray(out.logprobs),
                                      jnp.asarray(out.exit_logprobs), jnp.asarray(advantage, jnp.float32),
                                      jnp.asarray(mask, jnp.float32), jnp.asarray(generated, jnp.float32))
    stats = {k: float(v) for k, v in jax.device_get(stats).items()}
    update_s = time.perf_counter() - start
    correct = [rewards.exact_match(t.tolist(), answers[i // g]) for i, t in enumerate(out.tokens)]
    return params, opt_state, {
        **stats, "reward_mean": float(r.mean()), "reward_std": float(r.std()),
        "shaped_reward_mean": float(shaped.mean()),
        "accuracy": float(np.mean(correct)), "mean_loops": float(out.exit_loops[generated].mean()),
        "zero_variance_fraction": float(1.0 - keep.mean()),
        "rollout_tokens_per_s": float(generated.sum() / rollout_s), "rollout_s": rollout_s,
        "update_s": update_s}


def _save(manager, step: int, params, opt_state) -> None:
    manager.save(step, force=True, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        train=ocp.args.StandardSave({"step": np.asarray(step, np.int32), "opt_state": opt_state})))


def train(c: ml_collections.ConfigDict, workdir: str) -> dict:
    """Run (or resume) the RL run in `workdir`; returns the last logged record. Raises ConfigError /
    run.RunError before compiling, `Interrupted` after a signal-triggered save, `TrainingDiverged` on a
    non-finite loss."""
    validate(c)
    run.check_resume(workdir, c)
    os.makedirs(workdir, exist_ok=True)
    with run.lock(workdir):
        run.check_resume(workdir, c)
        model = _model(c, _init_from(c, workdir, resuming=run.latest_step(workdir) is not None))
        graphdef, state = nnx.split(model)
        params = nnx.to_pure_dict(state)
        tx = make_optimizer(c.optimizer.to_dict(), c.total_steps, params, stage=1)
        opt_state = tx.init(params)
        ref_params = params if c.rl.kl_coef > 0 else None
        manager = ocp.CheckpointManager(run.checkpoint_dir(workdir), item_names=("params", "train"),
                                        options=ocp.CheckpointManagerOptions(
                                            max_to_keep=c.max_checkpoints_to_keep or None, create=True,
                                            enable_async_checkpointing=False))
        resumed = manager.latest_step()
        summary_path = os.path.join(workdir, "summary.json")
        if resumed is not None:
            restored = manager.restore(resumed, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(params),
                train=ocp.args.StandardRestore({"step": np.asarray(0, np.int32), "opt_state": opt_state})))
            params, opt_state = restored["params"], restored["train"]["opt_state"]
            print(f"resumed from step {resumed}", file=sys.stderr)
            with open(summary_path) as f:
                summary = json.load(f)
        else:
            base = evaluate(model, c)
            summary = {f"base_{k}": v for k, v in base.items()}
            _write_json(summary_path, summary)
        run.record_config(workdir, c, step=resumed or 0)
        writer = metrics_lib.MetricsWriter(workdir, resumed_step=resumed)
        stop = run.StopRequests()
        update = _update_fn(graphdef, c, c.data.seq_len, tx)
        step, record = resumed or 0, {}
        try:
            while step < c.total_steps:
                params, opt_state, logged = rl_step(c, graphdef, params, opt_state, ref_params, update, step)
                step += 1
                if not math.isfinite(logged["loss"]):
                    raise TrainingDiverged(f"loss is {logged['loss']} at step {step}")
                if c.eval_every_steps and (step % c.eval_every_steps == 0 or step == c.total_steps):
                    held_out = evaluate(nnx.merge(graphdef, params), c)
                    logged.update({f"eval_{k}": v for k, v in held_out.items()})
                if step % c.log_every_steps == 0 or step == c.total_steps or "eval_accuracy" in logged:
                    writer.write(step, logged)
                    record = {"step": step, **logged}
                stopping = stop.check()
                if stopping or step == c.total_steps or (
                        c.checkpoint_every_steps and step % c.checkpoint_every_steps == 0):
                    _save(manager, step, params, opt_state)
                if stopping:
                    raise Interrupted(stop.requested or "signal", step)
        finally:
            stop.close()
            writer.close()
            manager.wait_until_finished()
            manager.close()
        final = evaluate(nnx.merge(graphdef, params), c)
        summary.update({f"final_{k}": v for k, v in final.items()})
        _write_json(summary_path, summary)
        return record


def _write_json(path: str, data: dict) -> None:
    """Write atomically (a temporary file renamed), so a kill never leaves half a file."""
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)

