"""`python -m ouro_jax.benchmarks`: a smoke run at tiny sizes prints markdown tables and merges its
figures into the JSON file; unknown names are refused in one line. (The measurements themselves are
benchmarks, not tests.)"""

import gzip
import json
import os
import subprocess
import sys

import pytest
from flax import nnx

from ouro_jax.model.config import tiny
from ouro_jax.model.ouro import Ouro, num_params


def _benchmarks(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ouro_jax.benchmarks", *args], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})


# Every benchmark of the registry at a tiny size (`--shape=tiny`, one repeat), so that a crash or a renamed
# flag fails here rather than in the next measurement. A new benchmark needs an entry.
SMOKE = {
    "train.compile": ["--batch=2", "--seq_len=8"],
    "train.memory": ["--batch=2", "--seq_len=8"],
    "train.fwd_bwd": ["--batch=2", "--seq_len=8", "--remat_policy=full"],
    "train.step": ["--batch=2", "--seq_len=8", "--scan_layers=false"],
    "train.sft": ["--batch=8", "--seq_len=64", "--sft_steps=3"],  # 8 rows: one per fake device
    "decode.speed": ["--batches=1,2", "--prompt_len=4", "--new_tokens=3"],
    "decode.cache": ["--prompt_len=4", "--new_tokens=3"],
    "decode.exit": ["--train_steps=4", "--examples=4", "--exit_batches=2", "--thresholds=0.5",
                    "--deltas=0.8", "--mechanism_thresholds=0.5"],
    "decode.rows": ["--row_batches=2", "--gate_scales=10", "--row_thresholds=0.5", "--prompt_len=4",
                    "--new_tokens=3"],
    "decode.split": ["--batches=2", "--prompt_len=4", "--new_tokens=3"],
    "convert.roundtrip": ["--preset=tiny", "--dtype=float32"],
}


# Benchmarks whose smoke run checks their figures too, in a test of their own.
OWN_SMOKE_TEST = {"serve": "tests/test_benchmarks.py::test_serve_smoke_run",
                  "eval.sweep": "tests/test_eval_tasks.py::test_eval_sweep_benchmark_smoke_run"}


def test_every_benchmark_has_a_smoke_run():
    from ouro_jax.benchmarks import BENCHMARKS

    assert sorted([*SMOKE, *OWN_SMOKE_TEST]) == sorted(BENCHMARKS)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for test in OWN_SMOKE_TEST.values():
        path, name = test.split("::")
        with open(os.path.join(repo, path)) as f:
            assert f"def {name}(" in f.read(), test


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMOKE))
def test_benchmark_smoke_run(name, tmp_path):
    figures = tmp_path / "bench.json"
    done = _benchmarks(f"--bench={name}", "--shape=tiny", "--repeats=1", f"--json={figures}", *SMOKE[name])
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"## {name}" in done.stdout and "|---|" in done.stdout
    entry = json.loads(figures.read_text())[name]
    assert entry["figures"] and entry["environment"]["platform"] == "cpu"


@pytest.mark.slow
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


def test_decode_split_without_a_decode_step_is_one_line():
    done = _benchmarks("--bench=decode.split", "--new_tokens=1")
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: decode.split: --new_tokens=1")


@pytest.mark.slow
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


_HLO = """HloModule jit__decode, entry_computation_layout={(f32[8,256]{1,0})->f32[8,256]{1,0}}

%scores (p0: f32[8,4,1,64], p1: f32[8,4,128,64]) -> f32[8,4,1,128] {
  %p0 = f32[8,4,1,64]{3,2,1,0} parameter(0)
  %p1 = f32[8,4,128,64]{3,2,1,0} parameter(1)
  ROOT %dot.7 = f32[8,4,1,128] dot(%p0, %p1), lhs_batch_dims={0,1}, rhs_batch_dims={0,1}
}

%inner (a: f32[8,256], b: f32[256,768]) -> f32[8,768] {
  %a = f32[8,256]{1,0} parameter(0)
  %b = f32[256,768]{1,0} parameter(1)
  ROOT %dot.3 = f32[8,768]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%outer (c: f32[8,256], d: f32[256,768]) -> f32[8,768] {
  %c = f32[8,256]{1,0} parameter(0)
  %d = f32[256,768]{1,0} parameter(1)
  ROOT %call.1 = f32[8,768]{1,0} call(%c, %d), to_apply=%inner
}

%scale (x: f32[8,256]) -> f32[8,256] {
  %x = f32[8,256]{1,0} parameter(0)
  ROOT %multiply.2 = f32[8,256]{1,0} multiply(%x, %x)
}

%body (state: (s32[], f32[8,256])) -> (s32[], f32[8,256]) {
  %state = (s32[], f32[8,256]{1,0}) parameter(0)
  %h = f32[8,256]{1,0} get-tuple-element(%state), index=1
  %w = f32[256,256]{1,0} constant({...})
  %dot.1 = f32[8,256]{1,0} dot(%h, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %ynn_fusion.4 = f32[8,768]{1,0} fusion(%h, %w), kind=kCustom, calls=%outer
  %attn_fusion = f32[8,4,1,128]{3,2,1,0} fusion(%h, %w), kind=kOutput, calls=%scores
  %loop_fusion.9 = f32[8,256]{1,0} fusion(%dot.1), kind=kLoop, calls=%scale
  %bitcast.5 = f32[8,256]{1,0} bitcast(%loop_fusion.9)
  ROOT %tuple.2 = (s32[], f32[8,256]{1,0}) tuple(%h, %bitcast.5)
}

ENTRY %main (arg: f32[8,256]) -> f32[8,256] {
  %arg = f32[8,256]{1,0} parameter(0)
  %while.17 = (s32[], f32[8,256]{1,0}) while(%arg), condition=%cond, body=%body
  ROOT %get-tuple-element.3 = f32[8,256]{1,0} get-tuple-element(%while.17), index=1
}
"""


def test_decode_split_puts_each_operation_in_its_category():
    """decode.split's classifier on hand-written HLO: a dot without batch dims and a library fusion
    whose computation calls one are weight matmuls, a fusion holding a batched dot is attention, an
    elementwise fusion is other; containers and free instructions have no time of their own (None)."""
    from ouro_jax.benchmarks.decode_split import hlo_categories

    categories = hlo_categories(_HLO)
    assert {name: kind for name, kind in categories.items() if kind is not None} == {
        "dot.1": "weight matmuls", "ynn_fusion.4": "weight matmuls", "attn_fusion": "attention",
        "loop_fusion.9": "other",
        # inside fused or called computations (never timed as operations of the decode loop's body):
        "dot.7": "attention", "dot.3": "weight matmuls", "multiply.2": "other"}
    untimed = {"while.17", "call.1", "bitcast.5", "tuple.2", "get-tuple-element.3", "state", "h", "w", "arg"}
    assert untimed <= {name for name, kind in categories.items() if kind is None}


def test_decode_split_categories_of_a_compiled_program():
    """On XLA's own text of a compiled program: the batched einsum is attention, the matmul with a
    weight a weight matmul, and every dot-free operation other."""
    import jax
    import jax.numpy as jnp

    from ouro_jax.benchmarks.decode_split import hlo_categories

    def program(q, keys, x, w):
        return jnp.einsum("bkh,bkmh->bkm", q, keys), jnp.tanh(x @ w) * 2.0

    args = (jnp.ones((2, 4, 8)), jnp.ones((2, 4, 16, 8)), jnp.ones((3, 8)), jnp.ones((8, 5)))
    categories = hlo_categories(jax.jit(program).lower(*args).compile().as_text())
    kinds = [kind for kind in categories.values() if kind is not None]
    assert kinds.count("attention") >= 1 and kinds.count("weight matmuls") >= 1 and "other" in kinds


def test_decode_split_sums_the_profiled_operations_of_one_module(tmp_path):
    """Only complete events of the named module's operations count, in seconds: an operation the HLO
    text does not name is other, a container (None) is not counted."""
    from ouro_jax.benchmarks.decode_split import trace_seconds

    def op(name, dur, module="jit__decode"):
        return {"ph": "X", "name": name, "dur": dur, "args": {"hlo_module": module, "hlo_op": name}}

    events = [op("dot.1", 30.0), op("dot.1", 10.0), op("attn_fusion", 25.0), op("loop_fusion.9", 5.0),
              op("copy.3", 2.0), op("dot.1", 1000.0, module="jit__prefill"), op("while.17", 500.0),
              {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 900.0},
              {"ph": "M", "name": "thread_name", "args": {"name": "python"}}]
    profile_dir = tmp_path / "plugins" / "profile" / "run"
    profile_dir.mkdir(parents=True)
    with gzip.open(profile_dir / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    categories = {"dot.1": "weight matmuls", "attn_fusion": "attention", "loop_fusion.9": "other",
                  "while.17": None}
    seconds, operations = trace_seconds(str(tmp_path), "jit__decode", categories)
    assert seconds == pytest.approx({"weight matmuls": 40e-6, "attention": 25e-6, "other": 7e-6})
    assert operations == {"weight matmuls": 2, "attention": 1, "other": 2}


@pytest.mark.slow
def test_decode_split_smoke_run_reports_shares_and_bytes(tmp_path):
    """A profiled decode at the cpu_benchmark shape: the three shares sum to 1, matmuls and attention
    both appear, and the bytes per step are the hand-counted ones (float32): 16 (loop, layer)
    applications of 802,816 layer weights plus the 4096 x 256 LM head; K/V of 16 slots x 1 row x
    4 heads x 64 x (4 prompt + 3 decoded positions, the one phase of 3 new tokens) x 2 (K and V)."""
    figures = tmp_path / "bench.json"
    done = _benchmarks("--bench=decode.split", "--batches=1", "--repeats=1", "--prompt_len=4",
                       "--new_tokens=3", f"--json={figures}")
    assert done.returncode == 0, done.stderr
    assert "| batch | ms / step | ms / step profiled | XLA operations / step | weight matmuls share |" in (
        done.stdout)
    (figure,) = json.loads(figures.read_text())["decode.split"]["figures"]["batches"]
    shares = figure["shares"]
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares["weight matmuls"] > 0 and shares["attention"] > 0 and figure["operations_per_step"] > 0
    assert figure["weight_mb_per_step"] == pytest.approx(4 * (16 * 802_816 + 4096 * 256) / 1e6)
    assert figure["kv_mb_per_step"] == pytest.approx(4 * 16 * 1 * 4 * 64 * (4 + 3) * 2 / 1e6)


@pytest.mark.slow
def test_serve_smoke_run(tmp_path):
    from ouro_jax.benchmarks.serve import workload
    from ouro_jax.model.config import tiny

    bad = _benchmarks("--bench=serve", "--serve_backends=static,nope")
    assert bad.returncode == 1 and bad.stderr.startswith("error: --serve_backends: unknown ['nope']")
    figures = tmp_path / "bench.json"
    done = _benchmarks("--bench=serve", "--shape=tiny", "--serve_requests=3", "--serve_rates=20",
                       "--serve_thresholds=none,0.5", "--serve_prompt_lens=2,6", "--serve_output_lens=2,9",
                       "--max_slots=2", f"--json={figures}")
    assert done.returncode == 0, done.stderr
    assert "| backend | exit | rate req/s | tok/s | vs static |" in done.stdout
    runs = json.loads(figures.read_text())["serve"]["figures"]["runs"]
    assert [(r["backend"], r["exit_threshold"]) for r in runs] == [
        ("static", None), ("hf", None), ("static", 0.5), ("hf", 0.5)]
    # Every request produced exactly its output length (no stop tokens in the benchmark).
    expected = sum(a.max_tokens for a in workload(3, 20.0, (2, 6), (2, 9), tiny().vocab_size))
    loops = tiny().total_ut_steps
    for r in runs:
        assert r["tokens"] == expected and r["tokens_per_s"] > 0
        assert 0 <= r["ttft_p50_s"] <= r["ttft_p99_s"] and 0 <= r["tpot_p50_s"] <= r["tpot_p99_s"]
        assert r["mean_loops"] == loops if r["backend"] == "hf" or r["exit_threshold"] is None else (
            1 <= r["mean_loops"] <= loops)
    assert runs[0]["throughput_vs_static"] == 1.0
