"""Several processes train as one: `python -m ouro_jax.train` as 2 processes x 4 CPU devices against 1 process
x 8 devices (metrics and parameters), per-process checkpoints, preemption (both processes SIGKILLed, then one
SIGTERMed) and exact resume, a resume with another process count, distributed-start settings, and the
per-process data shards (every example of an epoch read once across processes).

The processes are real (`jax.distributed.initialize("localhost:PORT", 2, i)` through --coordinator_address,
--num_processes, --process_id; gloo collectives between them). They share a persistent compilation cache
(process 0 of a rerun loads its programs from it) and compile at XLA's lowest optimisation level.
"""

import collections
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import SingleDeviceSharding

from ouro_jax import distributed, run
from ouro_jax import tokenizer as tokenizer_lib
from ouro_jax.data import build_eval_batches, build_train_dataset
from ouro_jax.data.pipeline import heldout_split

pytestmark = pytest.mark.slow  # two-process runs and their launch settings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 8
STEPS = 16
SMALL = {  # the demo, shrunk: a few seconds of steps after compiling
    "total_steps": STEPS, "log_every_steps": 1, "eval_every_steps": STEPS, "checkpoint_every_steps": 4,
    "data.batch_size": 16, "data.seq_len": 16, "data.eval_batches": 2,
    "model.hidden_size": 32, "model.intermediate_size": 64, "model.num_attention_heads": 2,
    "model.num_key_value_heads": 2, "model.head_dim": 16, "model.total_ut_steps": 2,
    "optimizer.warmup_steps": 2,
}
NOT_EXACT = {"tokens_per_s"}  # wall-clock dependent
TIMEOUT_S = 300
STARTED: list[subprocess.Popen] = []  # every training process started here, ended by `end_leftovers`
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _process_env(devices: int, **extra: str) -> dict[str, str]:
    """The environment of one CPU process with `devices` devices (the suite's 8-device flag removed; its
    fast-compile flag kept: JAX writes the persistent cache from process 0 only, so process 1 compiles in
    every run, and every run compiles the same programs, so the comparisons hold)."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices),
            "XLA_FLAGS": flags.strip(), **extra}


class Launch:
    """One training command started as `num_processes` processes (each DEVICES // num_processes CPU devices),
    output in WORKDIR.p<i>.log."""

    def __init__(self, workdir: str, num_processes: int, cache: str, *extra: str):
        self.workdir, self.num_processes = workdir, num_processes
        port = _free_port()
        flags = [f"--config.{k}={v}" for k, v in SMALL.items()]
        env = _process_env(DEVICES // num_processes, JAX_COMPILATION_CACHE_DIR=cache,
                           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
        self.logs = [f"{workdir}.p{i}.log" for i in range(num_processes)]
        self.procs = []
        for i, log in enumerate(self.logs):
            multi = [f"--coordinator_address=localhost:{port}", f"--num_processes={num_processes}",
                     f"--process_id={i}"] if num_processes > 1 else []
            with open(log, "w") as out:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "ouro_jax.train", "--config=configs/demo.py",
                     f"--workdir={workdir}", *flags, *multi, *extra],
                    cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))
        STARTED.extend(self.procs)

    def wait(self) -> list[int]:
        return [p.wait(timeout=TIMEOUT_S) for p in self.procs]

    def output(self, i: int) -> str:
        with open(self.logs[i]) as f:
            return f.read()

    def running(self) -> bool:
        return all(p.poll() is None for p in self.procs)


@pytest.fixture(autouse=True)
def end_leftovers():
    """A failed test leaves no training process behind (its peers would wait for it)."""
    yield
    for p in STARTED:
        if p.poll() is None:
            p.kill()
            p.wait()
    STARTED.clear()


GLOO_TEXTS = re.compile(r"\[Gloo\] Rank | is connected to | peer ranks\. "
                        r"|Expected number of connected peer ranks is : ")


def messages(output: str) -> list[str]:
    """The lines of a process's output, without gloo's connection reports ("[Gloo] Rank 0 is connected to 1
    peer ranks. Expected number of connected peer ranks is : 1"). Its C++ code writes a report in pieces,
    from several threads, so reports interleave with each other and with other output: the fixed texts are
    removed wherever they are, and the numbers left over are dropped where they stand alone on a line or
    before an error line."""
    lines = (re.sub(r"^\d+(?=error: )", "", line) for line in GLOO_TEXTS.sub("", output).splitlines())
    return [line for line in lines if not re.fullmatch(r"[\d\s]*", line)]


def records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in NOT_EXACT} for line in f]


def logged_steps(workdir) -> list[int]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line)["step"] for line in f if line.endswith("\n")]


def wait_until(condition, launch: Launch, what: str) -> None:
    deadline = time.time() + TIMEOUT_S
    while not condition():
        assert launch.running(), f"a process ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def final_params(workdir) -> list[np.ndarray]:
    """The last checkpoint's parameters, read onto one device whatever mesh saved them."""
    path = run.checkpoint_dir(workdir) / str(run.latest_step(workdir)) / "params"
    one = SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as checkpointer:
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                              checkpointer.metadata(path).item_metadata)
        return [np.asarray(x) for x in jax.tree.leaves(checkpointer.restore(path, target))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(1 process x 8 devices, 2 processes x 4 devices) uninterrupted runs, trained side by side."""
    root = tmp_path_factory.mktemp("multihost")
    cache = str(root / "xla_cache")
    one, two = Launch(str(root / "one"), 1, cache), Launch(str(root / "two"), 2, cache)
    for launch in (one, two):
        assert launch.wait() == [0] * launch.num_processes, launch.output(0)[-3000:]
    return {"one": one, "two": two, "cache": cache}


def test_two_processes_train_like_one(runs):
    one, two = runs["one"], runs["two"]
    want, got = records(one.workdir), records(two.workdir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # process 0 alone writes: each step once
    assert [r["step"] for r in got if "eval_loss_loop_1" in r] == [STEPS]
    for a, b in zip(want, got, strict=True):
        assert a.keys() == b.keys()
        for key in a:  # measured: 2/3 bit-identical, the rest within 4e-7 (gloo adds in another order)
            assert b[key] == pytest.approx(a[key], rel=1e-6), (a["step"], key)
    for a, b in zip(final_params(one.workdir), final_params(two.workdir), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    # every process saved its own shards and its own data position
    step_dir = run.checkpoint_dir(two.workdir) / str(STEPS)
    assert sorted(os.listdir(step_dir / "data_iter")) == [
        "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
    for item in ("params", "train"):
        assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(step_dir / item))
    # console output from process 0 only; it names the processes, devices and mesh
    first, second = two.output(0), two.output(1)
    assert "process 0 of 2: 4 local of 8 cpu devices; mesh data=8 fsdp=1 tensor=1" in first
    assert f"step {STEPS}/{STEPS}" in first and "held-out answer accuracy" in first
    assert "step " not in second and "accuracy" not in second


def _evaluate(model: str, out: Path, num_processes: int) -> list[tuple[int, str, str]]:
    """`python -m ouro_jax.evaluate` as `num_processes` processes of 2 CPU devices each; per process
    (exit status, stdout, stderr)."""
    port = _free_port()
    env = _process_env(2)
    procs, logs = [], []
    for i in range(num_processes):
        multi = [f"--coordinator_address=localhost:{port}", f"--num_processes={num_processes}",
                 f"--process_id={i}"] if num_processes > 1 else []
        logs.append((out.with_suffix(f".p{i}.out"), out.with_suffix(f".p{i}.err")))
        with open(logs[-1][0], "w") as stdout, open(logs[-1][1], "w") as stderr:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "ouro_jax.evaluate", f"--model={model}", f"--output_dir={out}",
                 "--num_batches=5", "--q=0.3,0.7", *multi], cwd=REPO, env=env, stdout=stdout, stderr=stderr))
    STARTED.extend(procs)
    return [(p.wait(timeout=TIMEOUT_S), out.read_text(), err.read_text())
            for p, (out, err) in zip(procs, logs, strict=True)]


def test_two_processes_evaluate_like_one(runs, tmp_path):
    model = runs["one"].workdir
    (single,) = _evaluate(model, tmp_path / "one", 1)
    first, second = _evaluate(model, tmp_path / "two", 2)  # 5 batches: 3 on process 0, 2 on process 1
    for status, _, stderr in (single, first, second):
        assert status == 0, stderr[-3000:]
    want = json.loads((tmp_path / "one" / "metrics.json").read_text())
    got = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert want.keys() == got.keys() and want["num_answers"] == got["num_answers"] == 5 * 16

    def compare(a, b, where):
        if isinstance(a, dict):
            assert a.keys() == b.keys(), where
            for k in a:
                compare(a[k], b[k], f"{where}.{k}")
        elif isinstance(a, list):
            assert len(a) == len(b), where
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                compare(x, y, f"{where}[{i}]")
        elif isinstance(a, float):
            assert b == pytest.approx(a, rel=1e-6, abs=1e-9), where
        else:
            assert a == b, where

    compare(want, got, "metrics")
    assert "| loop 1 |" in first[1] and messages(second[1]) == []  # process 0 alone prints and writes


def test_preempted_processes_resume_exactly(runs, tmp_path):
    workdir = str(tmp_path / "preempted")
    # SIGKILL both processes once a checkpoint is complete and a few more steps are logged
    first = Launch(workdir, 2, runs["cache"])
    wait_until(lambda: len(logged_steps(workdir)) >= 6 and run.latest_step(workdir) is not None, first,
               "a checkpoint")
    for p in first.procs:
        p.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = run.latest_step(workdir)
    assert killed_at in (4, 8, 12), killed_at
    # rerun both; SIGTERM only process 1 once the resumed run logs a step: both stop at the same step
    killed_file = os.stat(os.path.join(workdir, "metrics.jsonl")).st_ino  # resuming rewrites the file
    second = Launch(workdir, 2, runs["cache"])
    wait_until(lambda: os.stat(os.path.join(workdir, "metrics.jsonl")).st_ino != killed_file and (
        logged_steps(workdir)[-1] > killed_at), second, "a resumed step")
    second.procs[1].send_signal(signal.SIGTERM)
    assert second.wait() == [75, 75], second.output(0)[-3000:]
    stopped_at = run.latest_step(workdir)
    assert killed_at < stopped_at < STEPS and logged_steps(workdir)[-1] == stopped_at
    assert f"saved step {stopped_at}" in second.output(0)
    step_dir = run.checkpoint_dir(workdir) / str(stopped_at)
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(step_dir / "data_iter"))
    # the same command again finishes the run: every step as in the uninterrupted run, to the bit
    third = Launch(workdir, 2, runs["cache"])
    assert third.wait() == [0, 0], third.output(0)[-3000:]
    assert records(workdir) == records(runs["two"].workdir)


def test_other_process_count_stops_with_one_line(runs):
    resumed = Launch(runs["two"].workdir, 1, runs["cache"])
    assert resumed.wait() == [1]
    lines = messages(resumed.output(0))
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint 16 of "), lines
    assert "saved by 2 processes, this run has 1: resume with 2 processes" in lines[0]


def test_a_workdir_in_use_stops_every_process_with_one_line(tmp_path):
    workdir = tmp_path / "held"
    workdir.mkdir()
    (workdir / run.LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": 1}))  # init: alive
    launch = Launch(str(workdir), 2, str(tmp_path / "cache"))
    assert launch.wait() == [1, 1]
    first, second = (messages(launch.output(i)) for i in range(2))
    assert len(first) == 1 and first[0].startswith(f"error: --workdir {workdir} is in use by pid 1 on host ")
    assert second == ["error: process 0 could not start the run (its error says why)"]


def test_unreachable_coordinator_stops_with_one_line(tmp_path):
    address = f"localhost:{_free_port()}"  # nobody serves it
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "ouro_jax.train", "--config=configs/demo.py", f"--workdir={tmp_path / 'w'}",
         f"--coordinator_address={address}", "--num_processes=2", "--process_id=1",
         "--coordinator_timeout_s=2"],
        cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=120)
    assert result.returncode == distributed.TIMEOUT_STATUS
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"error: distributed start: process 1 of 2 did not connect to all processes through {address} within "
        "2 s"), lines
    assert time.perf_counter() - start < 60
    assert not (tmp_path / "w").exists()  # stopped before touching the workdir


def test_launch_settings():
    resolve = lambda env, **kw: distributed.resolve(environ=env, tpu_vm=False, **kw)
    assert resolve({}) == distributed.Launch("single", None, 1, 0)
    assert resolve({}, coordinator_address="h:1234", num_processes=4, process_id=3) == distributed.Launch(
        "explicit", "h:1234", 4, 3)
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:8476", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert resolve(env) == distributed.Launch("explicit", "10.0.0.2:8476", 2, 1)
    assert resolve(env, process_id=0).process_id == 0  # a flag wins over its variable
    split = {"JAX_COORDINATOR_ADDRESS": "w-0.w", "JAX_COORDINATOR_PORT": "6002"}
    assert resolve(split, num_processes=4, process_id=2) == distributed.Launch("explicit", "w-0.w:6002", 4, 2)
    assert resolve({}, num_processes=1).method == "single"
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "16", "SLURM_PROCID": "5",
             "SLURM_LOCALID": "1"}
    assert resolve(slurm) == distributed.Launch("slurm", None, 16, 5)
    assert resolve({**slurm, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}).method == "single"
    del slurm["SLURM_STEP_NODELIST"]  # inside sbatch but outside srun: not a task of a step
    assert resolve(slurm).method == "single"
    ompi = {"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2"}
    assert resolve(ompi) == distributed.Launch("openmpi", None, 4, 2)
    assert resolve({"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3"}).method == "gke_tpu"
    assert resolve({"TPU_WORKER_HOSTNAMES": "w-0", "MEGASCALE_NUM_SLICES": "2"}).method == "gke_tpu"
    assert resolve({"TPU_WORKER_HOSTNAMES": "w-0"}).method == "single"
    assert distributed.resolve(environ={}, tpu_vm=True).method == "cloud_tpu"
    for kwargs, message in [
            (dict(num_processes=2, process_id=2, coordinator_address="h:1"), "--process_id=2 is out of"),
            (dict(num_processes=2, coordinator_address="h:1"), "--process_id is needed"),
            (dict(process_id=1, coordinator_address="h:1"), "--num_processes is needed"),
            (dict(num_processes=2, process_id=1), "--coordinator_address=HOST:PORT is needed"),
            (dict(num_processes=2, process_id=1, coordinator_address="h"), "must be HOST:PORT"),
            (dict(num_processes=2, process_id=1, coordinator_address="h:70000"), "must be HOST:PORT")]:
        with pytest.raises(distributed.DistributedError, match=re.escape(message)):
            resolve({}, **kwargs)
    with pytest.raises(distributed.DistributedError, match="JAX_NUM_PROCESSES must be an integer"):
        resolve({"JAX_NUM_PROCESSES": "two"})
    assert resolve({}, coordinator_address="[::1]:80", num_processes=2, process_id=0).method == "explicit"


def test_a_machine_that_is_not_a_tpu_vm_trains_as_one_process():
    """A Google PCI device with libtpu installed (a GPU VM's network card, an AOT-compiling machine) makes
    `initialize` ask JAX's TPU detection, which finds no slice: one process, nothing started."""
    script = ("from ouro_jax import distributed\n"
              "distributed._maybe_cloud_tpu_vm = lambda: True\n"
              "print(distributed.initialize(timeout_s=20))\n"
              "import jax; print(jax.distributed.is_initialized(), jax.process_count())\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "TPU_", "MEGASCALE_"))
           and k not in distributed.ENV.values()}
    result = subprocess.run([sys.executable, "-c", script], env={**env, "JAX_PLATFORMS": "cpu"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == [
        "Launch(method='single', coordinator_address=None, num_processes=1, process_id=0)", "False 1"]


# Per-process data ----------------------------------------------------------------------------------------


def _segments(batch) -> list[str]:
    """The documents of a batch of packed rows (each shorter than a row: one segment; EOS dropped)."""
    tokenizer = tokenizer_lib.load("bytes")
    return [tokenizer.decode(ids[seg == s][:-1].tolist())
            for ids, seg in zip(batch["input_ids"], batch["segment_ids"], strict=True)
            for s in np.unique(seg[seg > 0])]


@pytest.mark.parametrize("num_docs,process_count", [(12, 2), (12, 3), (13, 2), (13, 3)])
def test_each_document_of_an_epoch_is_read_once_across_processes(tmp_path, num_docs, process_count):
    docs = [f"document {i:02d}" + "abc"[i % 3] * (i % 5) for i in range(num_docs)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(docs))
    data = {"source": "text", "tokenizer": "bytes", "seq_len": 32, "batch_size": 6, "num_epochs": 1,
            "eval_fraction": 0.2, "text": {"files": str(corpus)}}
    train, heldout = heldout_split(num_docs, 0.2)
    read, held = collections.Counter(), collections.Counter()
    for k in range(process_count):
        mine = [s for b in build_train_dataset(data, seed=3, process_index=k, process_count=process_count)
                for s in _segments(b)]
        assert len(mine) == len(range(k, len(train), process_count))  # its share, remainder included
        read.update(mine)
        held.update(s for b in build_eval_batches(data, seed=3, num_batches=100, process_index=k,
                                                  process_count=process_count) for s in _segments(b))
    assert read == collections.Counter(docs[i] for i in train)
    assert held == collections.Counter(docs[i] for i in heldout)


def test_task_rows_of_processes_are_blocks_of_the_one_process_batch():
    data = {"source": "phop", "seq_len": 16, "batch_size": 12}
    whole = iter(build_train_dataset(data, seed=1))
    parts = [iter(build_train_dataset(data, seed=1, process_index=k, process_count=3)) for k in range(3)]
    for _ in range(3):
        want, got = next(whole), [next(p) for p in parts]
        for key in want:
            np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key])
    evals = [build_eval_batches(data, seed=1, num_batches=2, process_index=k, process_count=3)
             for k in range(3)]
    for t, want in enumerate(build_eval_batches(data, seed=1, num_batches=2)):
        np.testing.assert_array_equal(np.concatenate([e[t]["input_ids"] for e in evals]), want["input_ids"])
