"""ouro_jax.experiments: the runs a study plans, the tables and checks it writes (hand-made results), a
killed suite rerunning only what is missing, measurements against a direct recomputation, and the CLI's
results.json / results.md / PNG and one-line errors on a tiny smoke run."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import ouro_jax
from ouro_jax.data import build_eval_batches
from ouro_jax.experiments import plan, suite, summary

TINY = {"data.batch_size": 16, "eval_every_steps": 0, "checkpoint_every_steps": 0,
        "model.intermediate_size": 32, "model.hidden_size": 32, "model.head_dim": 8}


# plan --------------------------------------------------------------------------------------------------


def test_plan_shapes_objectives_and_keys():
    cfg = plan.task_config("addition", steps=7, settings={"terms": 4}, overrides={"data.batch_size": 8})
    assert cfg.model.vocab_size == 12 and cfg.data.addition.terms == 4 and cfg.total_steps == 7
    assert plan.task_config("facts", steps=1).model.vocab_size == 160
    assert plan.task_config("phop", steps=1, settings={"p_min": 1, "p": 4}).model.vocab_size == 8
    runs = plan.compare_runs(cfg, ["1x1", "1x3", "3x1"], ["ouro", "last_loop"], [0, 1], "addition")
    assert [(r.model, r.objective, r.seed) for r in runs[:4]] == [
        ("1x1", "ouro", 0), ("1x3", "ouro", 0), ("1x3", "last_loop", 0), ("3x1", "ouro", 0)]
    assert len(runs) == 8 and len({r.key for r in runs}) == 8
    looped = runs[2].config
    assert (looped.model.num_hidden_layers, looped.model.total_ut_steps, looped.objective.weighting,
            looped.seed) == (1, 3, "last_loop", 0)
    assert runs[3].config.model.num_hidden_layers == 3 and runs[3].config.model.total_ut_steps == 1
    same = plan.compare_runs(cfg, ["1x3"], ["ouro"], [0], "addition")[0]
    assert same.key == runs[1].key  # the key is a function of the config: reruns find the run
    other = plan.compare_runs(plan.task_config("addition", steps=8, settings={"terms": 4},
                                               overrides={"data.batch_size": 8}), ["1x3"], ["ouro"], [0],
                              "addition")[0]
    assert other.key != same.key and other.label == same.label
    gate = plan.gate_runs(cfg, ["1x3"], ["printed", "next"], [0], "addition", gate_steps=5)
    assert [r.objective for r in gate] == ["ouro", "stage2", "stage2"]
    assert all(r.parent is gate[0] and r.config.objective.stage == 2 and r.config.total_steps == 5
               for r in gate[1:])
    assert gate[1].config.objective.pairing == "printed" and gate[2].key != gate[1].key
    betas = plan.beta_runs(cfg, ["1x3"], [0.0, 0.05], [0], "addition")
    assert [r.config.objective.beta for r in betas] == [0.0, 0.05]
    for bad, message in [("1y4", "is not KxL"), ("0x2", "must be >= 1")]:
        with pytest.raises(ValueError, match=message):
            plan.parse_model(bad)
    with pytest.raises(ValueError, match=r"unknown config key 'optimizer\.lr'"):
        plan.task_config("phop", steps=1, overrides={"optimizer.lr": 1.0})


# summary ----------------------------------------------------------------------------------------------


def fake(model, objective, seed, acc, **extra):
    loops = len(acc)
    return {"task": "phop", "model": model, "objective": objective, "seed": seed, "setting": "",
            "params": 1000, "answer_accuracy": acc, "answer_token_accuracy": acc,
            "loss": list(np.linspace(1.0, 0.5, loops)),
            "deeper_is_better": True, "train_wall_s": 10.0, **extra}


def test_compare_table_and_checks_by_hand():
    results = [fake("1x1", "ouro", s, [a]) for s, a in enumerate([0.50, 0.60])]
    results += [fake("4x1", "ouro", s, [a]) for s, a in enumerate([1.00, 0.99])]
    results += [fake("1x4", "ouro", s, [0.3, 0.5, 0.9, a]) for s, a in enumerate([0.995, 0.85])]
    results += [fake("1x4", "last_loop", s, [0.2, 0.3, 0.5, a]) for s, a in enumerate([0.99, 0.99])]
    section = summary.compare(results)
    rows = section["tables"][0]["rows"]
    assert [r[:2] for r in rows] == [["1x1", "(any: one loop)"], ["1x4", "ouro"], ["1x4", "last_loop"],
                                     ["4x1", "(any: one loop)"]]
    sd = np.std([0.995, 0.85], ddof=1) * 100
    assert rows[1][4:10] == ["30.0 ± 0.0", "50.0 ± 0.0", "90.0 ± 0.0", f"92.2 ± {sd:.1f}", "85.0", "2/2"]
    assert rows[0][5:8] == ["–", "–", "–"]
    checks = "\n".join(section["checks"])
    assert ("1x4 ouro seed 0: 99.5; vs iso-FLOP 4x1 100.0: PASS (>= -1 point); "
            "vs iso-param 1x1 50.0: PASS (>= +30 points)") in checks
    assert ("1x4 ouro seed 1: 85.0; vs iso-FLOP 4x1 99.0: FAIL (>= -1 point); "
            "vs iso-param 1x1 60.0: FAIL (>= +30 points)") in checks  # 85 < 99 - 1, 85 < 60 + 30
    assert "1x4 last_loop seed 1: 99.0; vs iso-FLOP 4x1 99.0: PASS" in checks
    assert "loop 1: +10.0, loop 2: +20.0, loop 3: +40.0" in checks
    assert section["data"]["1x4/ouro"]["answer_accuracy"]["1"] == [0.3, 0.5, 0.9, 0.85]
    losses = section["tables"][1]["rows"]
    assert losses[1] == ["1x4", "ouro", "1.000 ± 0.000", "0.833 ± 0.000", "0.667 ± 0.000", "0.500 ± 0.000",
                         f"92.2 ± {sd:.1f}"]


def test_gate_comparison_at_equal_depth_by_hand():
    curve = [{"q": 0.0, "mean_depth": 1.0, "accuracy": 0.3}, {"q": 0.5, "mean_depth": 3.0, "accuracy": 0.9},
             {"q": 1.0, "mean_depth": 4.0, "accuracy": 1.0}]
    assert summary.accuracy_at_depth(curve, 2.0) == pytest.approx(0.6)
    assert summary.accuracy_at_depth(curve, 3.5) == pytest.approx(0.95)
    assert summary.accuracy_at_depth(curve[1:], 2.0) is None
    better = [{**p, "accuracy": min(1.0, p["accuracy"] + 0.02)} for p in curve]
    results = [fake("1x4", "ouro", 0, [0.3, 0.5, 0.9, 1.0], q_exit=curve),
               fake("1x4", "stage2", 0, [0.3, 0.5, 0.9, 1.0], q_exit=better, setting="pairing=next")]
    section = summary.gate(results)
    rows = section["tables"][0]["rows"]
    assert [r[1] for r in rows] == ["Stage I gate", "Stage II gate (pairing=next)",
                                    "static exit (all rows at loop t)"]
    assert rows[0][3:5] == ["45.0", "60.0"] and rows[0][-1] == "90.0 (3.00)"  # depth 1.5, 2.0; q = 0.5
    assert rows[2][3:8] == ["40.0", "50.0", "70.0", "90.0", "95.0"] and rows[2][-1] == "–"
    assert section["checks"] == [
        "1x4 Stage II gate (pairing=next) minus Stage I gate at equal mean depth (points): "
        "1.5: +2.0, 2: +2.0, 2.5: +2.0, 3: +2.0, 3.5: +1.0",
        "1x4 static exit (all rows at loop t) minus Stage I gate at equal mean depth (points): "
        "1.5: -5.0, 2: -10.0, 2.5: -5.0, 3: +0.0, 3.5: +0.0"]


# suite: a killed suite reruns only what is missing; figures against a direct recomputation ------------


def test_killed_suite_reruns_only_missing_runs(tmp_path):
    from ouro_jax.train import loop

    cfg = plan.task_config("phop", steps=3, seq_len=16, overrides=TINY)
    runs = plan.compare_runs(cfg, ["1x1", "1x2"], ["ouro", "last_loop"], [0], "phop")
    calls, lines = [], []

    def trainer(killed_at=None):
        def train(config, workdir):
            calls.append(workdir)
            if len(calls) == killed_at:
                raise KeyboardInterrupt  # the suite is killed when it starts its n-th training
            return loop.train(config, workdir)
        return train

    with pytest.raises(KeyboardInterrupt):
        suite.execute(runs, str(tmp_path), train_fn=trainer(killed_at=2), num_batches=1, log=lines.append)
    assert suite.cached_result(str(tmp_path), runs[0]) is not None
    assert suite.cached_result(str(tmp_path), runs[1]) is None

    def train_then_killed(config, workdir):  # killed after training, before measuring
        calls.append(workdir)
        loop.train(config, workdir)
        raise KeyboardInterrupt

    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        suite.execute(runs[:2], str(tmp_path), train_fn=train_then_killed, num_batches=1, log=lines.append)
    assert [os.path.basename(c) for c in calls] == [runs[1].key]  # run 0 was not trained again

    calls.clear()
    results = suite.execute(runs, str(tmp_path), train_fn=trainer(), num_batches=1, log=lines.append)
    assert [os.path.basename(c) for c in calls] == [runs[1].key, runs[2].key]
    assert any(f"{runs[1].label}: resuming" in line for line in lines)
    assert results[runs[1].key]["resumed"] and not results[runs[2].key]["resumed"]
    calls.clear()
    again = suite.execute(runs, str(tmp_path), train_fn=trainer(), num_batches=1, log=lines.append)
    assert calls == [] and again == results

    # the measured figures equal a direct recomputation through another code path (model.loop readout)
    run = runs[1]  # 1x2, Ouro objective
    model = ouro_jax.from_pretrained(suite.run_dir(str(tmp_path), run))
    batch = build_eval_batches(run.config.data, seed=0, num_batches=1)[0]
    ce, correct, _ = ouro_jax.objective.per_loop_losses(model, {k: jnp.asarray(v) for k, v in batch.items()})
    mask = batch["loss_mask"].astype(bool)
    result = results[run.key]
    np.testing.assert_allclose(result["loss"], [np.asarray(ce[t])[mask].mean() for t in range(2)], rtol=1e-5)
    np.testing.assert_allclose(result["answer_accuracy"], np.asarray(correct)[:, :, -1].mean(axis=1))
    assert len(result["exit_pdf"]) == 2 and sum(result["exit_pdf"]) == pytest.approx(1.0, abs=1e-5)
    assert result["q_exit"][0]["mean_depth"] == 1.0 and result["q_exit"][-1]["mean_depth"] == 2.0
    np.testing.assert_allclose(result["q_exit"][-1]["accuracy"], result["answer_accuracy"][-1])


# the command ------------------------------------------------------------------------------------------


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "ouro_jax.experiments", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


def test_cli_smoke_run_writes_results(tmp_path):
    out = tmp_path / "suite"
    sets = ",".join(f"{k}={v}" for k, v in TINY.items())
    proc = cli("--task=phop", "--models=1x1,1x2", "--seeds=1", "--steps=3", "--seq_len=16",
               "--objectives=ouro", "--eval_batches=1", f"--set={sets}", f"--output_dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    section = results["phop/compare"]
    assert set(section["data"]) == {"1x1/ouro", "1x2/ouro"}
    assert len(section["data"]["1x2/ouro"]["answer_accuracy"]["0"]) == 2
    assert len(section["data"]["1x1/ouro"]["answer_accuracy"]["0"]) == 1
    assert section["runs_trained"] == 2 and section["settings"]["data"]["p"] == 3
    markdown = (out / "results.md").read_text()
    assert "| model | objective | params | seeds | loop 1 | loop 2 |" in markdown
    assert "--models=1x1,1x2" in markdown and "| 1x2 | ouro |" in markdown
    assert "| 1x2 | ouro |" in proc.stdout
    png = out / "phop_compare.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    rerun = cli("--task=phop", "--models=1x1,1x2", "--seeds=1", "--steps=3", "--seq_len=16",
                "--objectives=ouro", "--eval_batches=1", f"--set={sets}", f"--output_dir={out}", cwd=tmp_path)
    assert rerun.returncode == 0 and rerun.stdout.count("done before") == 2

    for args, message in [(["--models=1y4"], "is not KxL"), (["--task_settings=p"], "is not key=value"),
                          (["--study=beta", "--models=1x1"], "needs a looped model")]:
        proc = cli(*args, f"--output_dir={out}", cwd=tmp_path)
        assert proc.returncode == 1
        assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and message in proc.stderr
