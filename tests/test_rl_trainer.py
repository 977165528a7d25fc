"""The RL trainer (ouro_jax.rl.trainer, `python -m ouro_jax.rl`): bad configs in one line, reward rising
on a tiny task, resume from a checkpoint bit-identical to an uninterrupted run."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ouro_jax.rl import trainer

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


def _config(**rl):
    c = _rl_configs().get_config("tiny")
    c.rl.update(rl)
    return c


@pytest.mark.parametrize("key,value,message", [
    ("loss", "ppo", "config.rl.loss"),
    ("group_size", 1, "config.rl.group_size"),
    ("temperature", 0.0, "config.rl.temperature"),
    ("exit_policy", "sample", "config.rl.exit_policy"),
    ("skipped_kv", "zero", "config.rl.skipped_kv"),
    ("reward", "no_such", "reward"),
])
def test_bad_configs_are_refused(key, value, message):
    with pytest.raises(ValueError, match=message):
        trainer.validate(_config(**{key: value}))


@pytest.mark.slow
def test_cli_bad_config_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ouro_jax.rl", "--config=configs/rl.py:tiny", "--config.rl.loss=ppo",
         f"--workdir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300,
        cwd=REPO)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: config.rl.loss")
    assert not (tmp_path / "run").exists()  # refused before anything was written


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_reward_rises_and_resume_is_bit_identical(tmp_path):
    c = _config(reward="test_rl_trainer:first_token_is_two", prompts_per_step=4, group_size=8)
    c.total_steps, c.checkpoint_every_steps, c.eval_every_steps = 12, 6, 0
    c.optimizer.learning_rate = 1e-2
    full = str(tmp_path / "full")
    trainer.train(c, full)
    rewards = [r["reward_mean"] for r in _records(full)]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.2, rewards
    assert all(r["mismatch_max"] < 1e-5 for r in _records(full))  # the replay is exact
    # Resume: the same run directory with only the step-6 checkpoint kept reruns steps 7..12.
    resumed = str(tmp_path / "resumed")
    shutil.copytree(full, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "12"))
    trainer.train(c, resumed)
    timing = ("rollout_s", "update_s", "rollout_tokens_per_s")
    strip = lambda records: [{k: v for k, v in r.items() if k not in timing} for r in records]
    assert strip(_records(resumed)) == strip(_records(full))
    with open(os.path.join(full, "summary.json")) as f, open(os.path.join(resumed, "summary.json")) as g:
        assert json.load(f) == json.load(g)
