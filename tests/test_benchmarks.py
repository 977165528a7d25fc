"""`python -m ouro_jax.benchmarks`: a smoke run at tiny sizes prints markdown tables and merges its
figures into the JSON file; unknown names are refused in one line. (The measurements themselves are
benchmarks, not tests.)"""

import json
import os
import subprocess
import sys

from flax import nnx

from ouro_jax.model.config import tiny
from ouro_jax.model.ouro import Ouro, num_params


def _benchmarks(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ouro_jax.benchmarks", *args], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_smoke_run_prints_tables_and_merges_json(tmp_path):
    figures = tmp_path / "bench.json"
    figures.write_text(json.dumps({"earlier.bench": {"figures": {"x": 1}}}))
    done = _benchmarks("--bench=decode.cache,convert", "--repeats=1", "--prompt_len=4", "--new_tokens=3",
                       "--preset=tiny", "--dtype=float32", f"--json={figures}")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.index("## decode.cache") < out.index("## convert.roundtrip")
    assert "| kv_sharing | prompt bytes |" in out and "| phase | seconds | peak RSS | / model |" in out

    data = json.loads(figures.read_text())
    assert sorted(data) == ["convert.roundtrip", "decode.cache", "earlier.bench"]
    modes = data["decode.cache"]["figures"]["modes"]
    # Decode-time KV sharing keeps one of the T = 4 loops' entries for every decoded token.
    assert [m["kv_sharing"] for m in modes] == ["none", "last", "average"]
    assert [m["decoded_vs_none"] for m in modes] == [1.0, 0.25, 0.25]
    assert all(m["total_bytes"] == m["prompt_bytes"] + m["decoded_bytes"] for m in modes)
    roundtrip = data["convert.roundtrip"]["figures"]
    assert roundtrip["model_bytes"] == 4 * num_params(Ouro(tiny(), rngs=nnx.Rngs(0)))
    assert roundtrip["safetensors_bytes"] >= roundtrip["model_bytes"]
    assert data["decode.cache"]["environment"]["platform"] == "cpu"


def test_unknown_benchmark_is_one_line():
    done = _benchmarks("--bench=train.compile,decode.sped")
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: unknown benchmark 'decode.sped'")


def test_exit_benchmark_scores_answers_with_the_runs_own_task():
    """decode.exit's accuracy reads the task's targets, so a mixed-hop run (hop token first) is scored on
    its own examples: the targets themselves score 100 %, a wrong last answer 0 % at the last position."""
    from ouro_jax.benchmarks.decode import _answer_accuracy
    from ouro_jax.data.tasks import PHop

    examples = PHop(n=16, p=3, alphabet=4, p_min=1, seed=0, stream=1).batch(range(32))
    answers = examples["targets"][:, -8:].copy()
    assert _answer_accuracy(examples, answers) == (100.0, 100.0)
    answers[:, -1] = (answers[:, -1] + 1) % 4
    accuracy, last = _answer_accuracy(examples, answers)
    assert last == 0.0 and 0.0 < accuracy < 100.0
