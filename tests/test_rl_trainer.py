"""The RL trainer (ouro_jax.rl.trainer, `python -m ouro_jax.rl`): bad configs in one line, reward rising
on a tiny task, resume from a checkpoint bit-identical to an uninterrupted run."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from ouro_jax.rl import trainer

from util import run_until

REPO = os.path.join(os.path.dirname(__file__), "..")


def _rl_configs():
    spec = importlib.util.spec_from_file_location("_config_rl", os.path.join(REPO, "configs", "rl.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def first_token_is_two(generated, answer):
    """A tiny task a random model can learn by RL alone: its first generated token should be 2."""
    del answer
    return float(generated[0] == 2)


TIMING = ("rollout_s", "update_s", "rollout_tokens_per_s")  # wall-clock dependent


def _records(workdir):
    """metrics.jsonl without its wall-clock fields."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def _config(**rl):
    c = _rl_configs().get_config("tiny")
    c.rl.update(rl)
    return c


@pytest.mark.parametrize("key,value,message", [
    ("loss", "ppo", "config.rl.loss"),
    ("group_size", 1, "config.rl.group_size"),
    ("temperature", 0.0, "config.rl.temperature"),
    ("exit_policy", "adaptive", "config.rl.exit_policy"),
    ("depth_cost", 0.1, "config.rl.depth_cost"),  # the depth is replayed under Q-exit, not trained
    ("skipped_kv", "zero", "config.rl.skipped_kv"),
    ("reward", "no_such", "reward"),
])
def test_bad_configs_are_refused(key, value, message):
    with pytest.raises(ValueError, match=message):
        trainer.validate(_config(**{key: value}))


def test_demo_trains_a_base_on_its_own_task():
    """`demo` trains a Stage I base when no init_from is given: the demo recipe on the RL run's mixed p-hop
    task (its vocabulary: 4 symbols + 3 hop-count tokens); base_steps on another task is refused."""
    c = _rl_configs().get_config("demo")
    trainer.validate(c)
    base = trainer.base_config(c)
    assert base.total_steps == c.base_steps > 0 and base.model.vocab_size == 7
    assert base.data.source == "phop" and base.data.phop.p_min == 1 and base.seed == c.seed
    addition = _rl_configs().get_config("tiny")
    addition.base_steps = 10
    with pytest.raises(ValueError, match=r"config\.base_steps"):
        trainer.validate(addition)


@pytest.mark.slow
def test_cli_bad_config_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ouro_jax.rl", "--config=configs/rl.py:tiny", "--config.rl.loss=ppo",
         f"--workdir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300,
        cwd=REPO)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: config.rl.loss")
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.slow
def test_reward_rises_depth_falls_and_resume_is_bit_identical(tmp_path):
    """Sampled exits with a depth cost: the task reward rises, the loops per token fall (the exit
    log-probs carry the gradient to the gate), the replay is exact for tokens and exits; a run resumed
    from its step-6 checkpoint reruns steps 7..12 bit-identically (the sampler's exits included)."""
    c = _config(reward="test_rl_trainer:first_token_is_two", prompts_per_step=4, group_size=8,
                exit_policy="sample", depth_cost=0.3)
    c.total_steps, c.checkpoint_every_steps, c.eval_every_steps = 12, 6, 0
    c.optimizer.learning_rate = 1e-2
    full = str(tmp_path / "full")
    trainer.train(c, full)
    records = _records(full)
    first, last = lambda key: np.mean([r[key] for r in records[:3]]), lambda key: np.mean(
        [r[key] for r in records[-3:]])
    assert last("reward_mean") > first("reward_mean") + 0.2, records
    assert last("mean_loops") < first("mean_loops") - 0.3, records
    assert all(r["mismatch_max"] < 1e-5 and r["exit_mismatch_max"] < 1e-5 for r in records)
    resumed = str(tmp_path / "resumed")
    shutil.copytree(full, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "12"))
    trainer.train(c, resumed)
    assert _records(resumed) == records
    with open(os.path.join(full, "summary.json")) as f, open(os.path.join(resumed, "summary.json")) as g:
        assert json.load(f) == json.load(g)


@pytest.mark.slow
def test_sigkill_and_resume_give_bit_identical_records(tmp_path):
    """`python -m ouro_jax.rl` (Q-exit rollouts) far longer than the test: killed past step 4, resumed,
    stopped by SIGTERM a few steps later (exit 75); an uninterrupted run agrees on every common record."""
    def cli(workdir):
        return [sys.executable, "-m", "ouro_jax.rl", "--config=configs/rl.py:tiny", f"--workdir={workdir}",
                "--config.total_steps=100000", "--config.checkpoint_every_steps=2",
                "--config.eval_every_steps=0"]

    killed = str(tmp_path / "killed")
    code, killed_at = run_until(cli(killed), killed, 4, signal.SIGKILL)
    assert code == -signal.SIGKILL and killed_at >= 4
    assert run_until(cli(killed), killed, killed_at + 3, signal.SIGTERM)[0] == 75
    resumed = _records(killed)
    assert [r["step"] for r in resumed] == list(range(1, len(resumed) + 1))
    uninterrupted = str(tmp_path / "uninterrupted")
    assert run_until(cli(uninterrupted), uninterrupted, len(resumed), signal.SIGTERM)[0] == 75
    assert _records(uninterrupted)[:len(resumed)] == resumed
