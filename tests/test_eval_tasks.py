"""lm-eval tasks per loop from one pass (`ouro_jax.evaluate.tasks`): every loop's and every Q-exit
threshold's value equals a separate run of the native lm-eval model at that depth (loops past the trained
T included), the scoring requests run one forward per batch for the whole sweep, and the command line's
bad input is one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lm_eval
from lm_eval.tasks import TaskManager

from ouro_jax.convert.pretrained import save_pretrained
from ouro_jax.evaluate import tasks
from ouro_jax.evaluate.lm_eval import OuroLM
from ouro_jax.model.config import tiny
from ouro_jax.model.ouro import Ouro

REPO = Path(__file__).resolve().parents[1]
SMOKE_DOCS = REPO / "notebooks" / "tasks" / "loop_smoke.jsonl"
TRAINED = 3
LOOPS = [1, 2, 3, 4]  # loop 4 extrapolates
THRESHOLDS = (0.3, 0.7)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random Ouro (T = 3) with the Ouro tokenizer's vocabulary, its gate scaled so tokens exit at
    various loops, exported with the tokenizer."""
    model = Ouro(tiny(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                      total_ut_steps=TRAINED), rngs=nnx.Rngs(1))
    kernel = model.early_exit_gate.kernel
    kernel[...] = 4.0 * jax.random.normal(jax.random.key(2), kernel.shape) / np.sqrt(32)
    return str(save_pretrained(model, tmp_path_factory.mktemp("tasks") / "hf", dtype="float32",
                               tokenizer="ouro"))


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("yaml")
    tasks.write_local_tasks(directory, SMOKE_DOCS)
    return directory


def counted(fn, calls):
    def wrapper(*args):
        calls.append(1)
        return fn(*args)
    return wrapper


def native(hf_dir, manager, names, calls=None, **depth):
    """One lm-eval run of the native model at a depth: ({task: its metrics}, mean loops over all tasks)."""
    lm = OuroLM(pretrained=hf_dir, batch_size=4, **depth)
    if calls is not None:
        lm._score = counted(lm._score, calls)
    result = lm_eval.simple_evaluate(model=lm, tasks=list(names), task_manager=manager, bootstrap_iters=0,
                                     log_samples=False)
    return {name: tasks._metrics(result["results"][name]) for name in names}, lm.mean_loops


@pytest.fixture(scope="module")
def swept(hf_dir, task_dir):
    manager = TaskManager(include_path=str(task_dir))
    lm = tasks.LoopSweepLM(hf_dir, LOOPS, THRESHOLDS, batch_size=4)
    calls = []
    lm._sweep = counted(lm._sweep, calls)
    chosen = tasks.load_tasks(manager, ["loop_smoke_mc", "loop_smoke_rolling"])
    return tasks.sweep(lm, chosen, manager), calls, manager


@pytest.mark.slow
def test_sweep_equals_separate_native_runs(swept, hf_dir):
    results, _, manager = swept
    assert results["loop_smoke_mc"]["metric"] == "acc,none"
    assert results["loop_smoke_rolling"]["metric"] == "word_perplexity,none"
    for k in LOOPS:  # the native model at loop k: exit_at_loop=k, num_loops=k past the trained T
        want, mean_loops = native(hf_dir, manager, results, num_loops=max(k, TRAINED), exit_at_loop=k)
        assert mean_loops == k
        for task, entry in results.items():
            assert entry["metrics"][f"loop {k}"] == pytest.approx(want[task], rel=1e-4, abs=1e-4)
            assert entry["loops"][str(k)] == pytest.approx(want[task][entry["metric"]], rel=1e-4, abs=1e-4)
    for task, entry in results.items():
        depths = []
        for q in THRESHOLDS:  # Q-exit over the trained T loops, one task per run for its mean loops
            want, mean_loops = native(hf_dir, manager, [task], exit_threshold=q)
            got = entry["q_exit"][f"{q:g}"]
            assert entry["metrics"][f"q={q:g}"] == pytest.approx(want[task], rel=1e-4, abs=1e-4)
            assert got["value"] == pytest.approx(want[task][entry["metric"]], rel=1e-4, abs=1e-4)
            assert got["mean_loops"] == pytest.approx(mean_loops, rel=1e-6)
            depths.append(got["mean_loops"])
        assert 1 < depths[0] < depths[1] < TRAINED  # the gate really exits tokens at different loops
    rolling = results["loop_smoke_rolling"]["loops"].values()  # depth changes the score (4 documents'
    assert len({round(v, 6) for v in rolling}) == len(LOOPS)   # accuracy is too coarse to show it)


@pytest.mark.slow
def test_a_sweep_runs_one_forward_per_batch(swept, hf_dir):
    results, calls, manager = swept
    single = []  # one native evaluation of both tasks at the largest loop count
    native(hf_dir, manager, results, single, num_loops=max(LOOPS))
    assert len(calls) == len(single) > 0


@pytest.mark.slow
def test_generation_per_depth_equals_native_runs(hf_dir, task_dir):
    manager = TaskManager(include_path=str(task_dir))
    lm = tasks.LoopSweepLM(hf_dir, [2, 4], (0.5,), batch_size=4)
    entry = tasks.sweep(lm, tasks.load_tasks(manager, ["loop_smoke_gen"]), manager)["loop_smoke_gen"]
    for k in (2, 4):
        want, _ = native(hf_dir, manager, ["loop_smoke_gen"], num_loops=max(k, TRAINED), exit_at_loop=k)
        assert entry["metrics"][f"loop {k}"] == want["loop_smoke_gen"]
    want, mean_loops = native(hf_dir, manager, ["loop_smoke_gen"], exit_threshold=0.5)
    assert entry["q_exit"]["0.5"] == {"value": want["loop_smoke_gen"]["exact_match,none"],
                                      "mean_loops": mean_loops}
    assert 1 <= mean_loops <= TRAINED


def test_loop_ranges_parse_and_are_checked():
    assert tasks.parse_loops("1-4,8") == [1, 2, 3, 4, 8]
    assert tasks.parse_loops("3,1,3") == [1, 3]
    for bad, message in [("0-8", "1..32"), ("1-33", "1..32"), ("8-1", "1..32"), ("a", "expected"),
                         ("", "no loop")]:
        with pytest.raises(ValueError, match=message):
            tasks.parse_loops(bad)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["unknown task", "loops past 32", "limit 0", "loop 0", "threshold 2"])
def test_cli_bad_input_is_one_line(hf_dir, task_dir, tmp_path, case):
    args = {"unknown task": ["--tasks=loop_smoke_mc,no_such_task_xyz"], "loops past 32": ["--loops=1-33"],
            "limit 0": ["--limit=0"], "loop 0": ["--loops=0,1"], "threshold 2": ["--exit_thresholds=0.5,2"]}
    expected = {"unknown task": "unknown task: no_such_task_xyz", "loops past 32": "1..32",
                "limit 0": "--limit", "loop 0": "1..32", "threshold 2": "[0, 1]"}
    out = tmp_path / "out"
    out.mkdir()
    (out / "tasks.json").write_text("{}")  # an earlier result stays as it was
    proc = subprocess.run(
        [sys.executable, "-m", "ouro_jax.evaluate", f"--model={hf_dir}", "--tasks=loop_smoke_mc",
         f"--include_path={task_dir}", f"--output_dir={out}", *args[case]],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert expected[case] in lines[0]
    assert (out / "tasks.json").read_text() == "{}"
    assert sorted(p.name for p in out.iterdir()) == ["tasks.json"]


@pytest.mark.slow
def test_cli_writes_table_json_and_plots(hf_dir, task_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ouro_jax.evaluate", f"--model={hf_dir}", "--tasks=loop_smoke_mc",
         f"--include_path={task_dir}", f"--output_dir={tmp_path}", "--loops=1-4", "--exit_thresholds=0.5",
         "--limit=3", "--batch_size=4"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "tasks.json").read_text())["loop_smoke_mc"]
    assert list(result["loops"]) == ["1", "2", "3", "4"] and list(result["q_exit"]) == ["0.5"]
    assert all(abs(3 * x - round(3 * x)) < 1e-9 for x in result["loops"].values())  # --limit=3 documents
    table = [line for line in proc.stdout.splitlines() if line.startswith("| loop_smoke_mc")]
    assert len(table) == 1 and table[0].count("|") == 1 + 2 + 4 + 1 and "**T=3**" in proc.stdout
    for name in ("metric_vs_loops", "metric_vs_mean_loops"):
        assert (tmp_path / f"{name}.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_eval_sweep_benchmark_smoke_run(tmp_path):
    figures = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "ouro_jax.benchmarks", "--bench=eval.sweep", "--repeats=1", "--eval_docs=2",
         "--eval_loops=3", "--eval_trained_loops=2", "--eval_hidden_size=16", "--eval_layers=1",
         "--eval_batch=4", f"--json={figures}"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "| sweep |" in proc.stdout and "sweep / one = " in proc.stdout
    result = json.loads(figures.read_text())["eval.sweep"]["figures"]
    assert sorted(result["seconds"]) == ["one", "separate", "sweep", "sweep+q"]
    assert result["ratio_to_one"]["one"] == 1.0 and all(s > 0 for s in result["seconds"].values())
