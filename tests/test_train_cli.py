"""`python -m ouro_jax.train` and `python -m ouro_jax.convert` as a careless user runs them: every mistake is
one line and a non-zero exit with every file that existed before left byte-identical; one training per run;
Ctrl-C saves and the rerun continues exactly; exports never destroy a run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ouro_jax import run
from ouro_jax.train import loop, recipes

from util import optimized_env

REPO = Path(__file__).resolve().parent.parent
SMALL = {
    "total_steps": 6, "log_every_steps": 1, "eval_every_steps": 0, "checkpoint_every_steps": 3,
    "data.batch_size": 8, "data.seq_len": 16, "data.eval_batches": 1,
    "model.hidden_size": 32, "model.intermediate_size": 64, "model.num_attention_heads": 2,
    "model.num_key_value_heads": 2, "model.head_dim": 16, "model.total_ut_steps": 2,
    "optimizer.warmup_steps": 2,
}


def train_args(workdir, *extra, config="configs/demo.py", **overrides):
    flags = [f"--config.{k}={v}" for k, v in {**SMALL, **overrides}.items()]
    return [sys.executable, "-m", "ouro_jax.train", f"--config={REPO / config}", f"--workdir={workdir}",
            *flags, *extra]


def run_cli(args, cwd=REPO, env=None):
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**(env or os.environ), "JAX_PLATFORMS": "cpu"})


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_refused(result, needle):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert "Traceback" not in lines[0], lines[0]
    assert needle in lines[0], lines[0]


def records(workdir):
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in lines]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 6-step run, trained in-process with the same config as `train_args`."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    c = recipes.demo()
    c.update_from_flattened_dict(SMALL)
    loop.train(c, str(workdir))
    return workdir


@pytest.mark.parametrize("extra, needle", [
    ({"totl_steps": 5}, "unknown config key 'totl_steps'; did you mean 'total_steps'?"),
    ({"model.hidden_size": 64}, "another model (model.hidden_size: 32 -> 64)"),
    ({"optimizer.learning_rate": 0.5}, "another config (optimizer.learning_rate: 0.002 -> 0.5)"),
])
@pytest.mark.slow
def test_mistakes_against_an_existing_run_touch_nothing(trained, extra, needle):
    before = snapshot(trained)
    assert_refused(run_cli(train_args(trained, **extra)), needle)
    assert snapshot(trained) == before


@pytest.mark.parametrize("config, needle", [
    ("configs/demoo.py", "demoo.py"),
    ("configs/demo.py:steps=abc", "steps='abc' is not an integer"),
    ("configs/ouro_1p4b.py:9", "stage='9' must be one of 1a, 1b, 2, 3, 4"),
])
def test_bad_config_files_and_variants(tmp_path, config, needle):
    result = run_cli(train_args(tmp_path / "new", config=config))
    assert_refused(result, needle)
    assert result.stderr.count(config.split(":")[0]) == 1  # the file is named once
    assert not (tmp_path / "new").exists()


def test_a_config_file_that_raises_names_the_exception(tmp_path):
    broken = tmp_path / "mine.py"
    broken.write_text("def get_config():\n    return {}['lr']\n")
    assert_refused(run_cli(train_args(tmp_path / "new", config=str(broken))), "KeyError: lr")
    assert not (tmp_path / "new").exists()


def test_workdir_that_is_a_file(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("my notes")
    assert_refused(run_cli(train_args(target)), "is a file")
    assert target.read_text() == "my notes"


def test_a_url_workdir_is_refused_and_nothing_is_created(tmp_path):
    assert_refused(run_cli(train_args("gs://bucket/run"), cwd=tmp_path),
                   "--workdir gs://bucket/run: URLs are not supported")
    assert list(tmp_path.iterdir()) == []  # no local "gs:" directory


@pytest.mark.slow
def test_a_second_training_is_refused_and_a_stale_lock_taken_over(tmp_path):
    workdir = tmp_path / "busy"
    first = subprocess.Popen(train_args(workdir, total_steps=100000, checkpoint_every_steps=0), cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (workdir / "metrics.jsonl").exists():
            time.sleep(0.1)
        before = snapshot(workdir)
        second = run_cli(train_args(workdir, total_steps=100000, checkpoint_every_steps=0))
        assert_refused(second, f"in use by pid {first.pid} on host")
        assert {k: v for k, v in snapshot(workdir).items() if k != "metrics.jsonl"} == {
            k: v for k, v in before.items() if k != "metrics.jsonl"}
    finally:
        first.kill()
        first.wait()
    assert json.loads((workdir / run.LOCK).read_text())["pid"] == first.pid  # left behind by the kill
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / run.LOCK).write_text((workdir / run.LOCK).read_text())
    result = run_cli(train_args(stale, total_steps=2))
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (stale / run.LOCK).exists() and run.latest_step(stale) == 2


@pytest.mark.slow
def test_ctrl_c_saves_and_the_rerun_continues_exactly(tmp_path):
    steps = {"total_steps": 120, "checkpoint_every_steps": 0, "eval_every_steps": 60}
    env = optimized_env()  # 240 steps of training
    reference = tmp_path / "reference"
    done = run_cli(train_args(reference, **steps), env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    evals = [r for r in records(reference) if "eval_loss_loop_1" in r]
    assert [r["step"] for r in evals] == [60, 120]
    for r in evals:  # each evaluation is printed as it happens
        accuracy = "  ".join(f"loop {t}: {100 * r[f'eval_answer_accuracy_loop_{t}']:.1f}%" for t in (1, 2))
        assert f"held-out answer accuracy (step {r['step']}) per loop: {accuracy}\n" in done.stderr
    workdir = tmp_path / "interrupted"
    proc = subprocess.Popen(train_args(workdir, **steps), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 240
    while time.time() < deadline and not (
            (workdir / "metrics.jsonl").exists() and len(records(workdir)) >= 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]  # saved; "rerun me"
    assert "Traceback" not in err and "stopped: SIGINT: saved step" in err
    saved = run.latest_step(workdir)
    assert saved is not None and 5 <= saved < 120
    assert out.strip().startswith(f"step {records(workdir)[-1]['step']}: loss ")
    rerun = run_cli(train_args(workdir, **steps), env=env)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resumed from step {saved}" in rerun.stderr
    assert records(workdir) == records(reference)


@pytest.mark.slow
def test_export_never_destroys_a_run(trained, tmp_path):
    before = snapshot(trained)
    convert = [sys.executable, "-m", "ouro_jax.convert", "--to=hf", f"--source={trained}", "--tokenizer=none"]
    for out, needle in [(trained, "must not be, contain or lie inside the source"),
                        (trained / "export", "must not be, contain or lie inside the source"),
                        (trained.parent, "must not be, contain or lie inside the source")]:
        assert_refused(run_cli([*convert, f"--output_dir={out}", "--overwrite"]), needle)
    other = tmp_path / "somebody_elses"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    assert_refused(run_cli([*convert, f"--output_dir={other}", "--overwrite"]), "not an earlier export")
    assert (other / "thesis.tex").read_text() == "years of work"
    assert snapshot(trained) == before
    exported = tmp_path / "hf"
    assert run_cli([*convert, f"--output_dir={exported}"]).returncode == 0
    done = run_cli([*convert, f"--output_dir={exported}", "--overwrite"])  # an earlier export: replaced
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
def test_export_of_a_run_without_checkpoint_is_one_quiet_line(tmp_path):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model": {"vocab_size": 4}, "total_steps": 1}))
    result = run_cli([sys.executable, "-m", "ouro_jax.convert", "--to=hf", f"--source={empty}",
                      f"--output_dir={tmp_path / 'out'}"])
    assert_refused(result, "no complete checkpoint")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_readme_snippet_runs_from_the_clones_parent_folder(tmp_path):
    (tmp_path / "ouro_jax").mkdir()  # a folder named like the package, e.g. the clone itself
    snippet = (REPO / "README.md").read_text().split("```python\n", 1)[1].split("```", 1)[0]
    assert "ouro_jax.PRESETS" in snippet
    result = subprocess.run([sys.executable, "-c", snippet + "print(out.logits.shape, loop.shape)"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0 and "(4, 1, 4, 128) (1, 4)" in result.stdout, result.stderr[-2000:]
