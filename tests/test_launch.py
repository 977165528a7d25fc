"""The launchers in launch/: shellcheck-clean, and their --dry_run prints the exact commands: each printed
line is parsed back by bash, its flags are the expected ones, and the commands they hand to remote shells (a
TPU worker, an xpk pod) run the training command with exactly the given arguments (stub `python`)."""

import os
import re
import shutil
import stat
import subprocess
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["local.sh", "local_multiprocess.sh", "tpu_pod.sh", "xpk.sh", "slurm_gpu.sbatch"]
ODD = "--config.data.text.files=/data/a b.txt,it's.jsonl"  # spaces and quotes survive every layer


def dry_run(script: str, *args: str) -> list[list[str]]:
    """The commands `script --dry_run args` prints, each parsed by bash into its arguments."""
    result = subprocess.run(["bash", os.path.join(REPO, "launch", script), "--dry_run", *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    commands = []
    for line in result.stdout.splitlines():
        line = re.sub(r"(?<!\\)( > \S+ 2>&1)? &$", "", line.split(" # ")[0])  # a comment, a background job
        parsed = subprocess.run(["bash", "-c", 'eval "set -- $1"; printf "%s\\0" "$@"', "bash", line],
                                capture_output=True, text=True, check=True)
        commands.append(parsed.stdout.split("\0")[:-1])
    return commands


def flag(command: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in command if a.startswith(f"{name}=")]
    assert len(values) == 1, (name, command)
    return values[0]


def stub(path, body: str) -> None:
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_well_formed(script):
    path = os.path.join(REPO, "launch", script)
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    assert shutil.which("shellcheck"), "shellcheck is needed (Debian/Ubuntu: apt-get install shellcheck)"
    result = subprocess.run(["shellcheck", path], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.slow
def test_local_multiprocess():
    commands = dry_run("local_multiprocess.sh", "--num_processes=3", "--devices_per_process=2", "--port=4567",
                       "configs/demo.py", "runs/x", ODD)
    assert len(commands) == 3
    for i, command in enumerate(commands):
        assert command[:5] == ["env", "JAX_PLATFORMS=cpu", "JAX_NUM_CPU_DEVICES=2",
                               f"JAX_COMPILATION_CACHE_DIR={os.path.expanduser('~/.cache/ouro_jax/xla')}",
                               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1"]
        assert command[5:8] == ["python", "-m", "ouro_jax.train"]
        assert command[8:] == ["--config=configs/demo.py", "--workdir=runs/x",
                               "--coordinator_address=localhost:4567", "--num_processes=3",
                               f"--process_id={i}", ODD]
    bad = subprocess.run(["bash", os.path.join(REPO, "launch", "local_multiprocess.sh"), "--num_processes=0",
                          "c", "w"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith("error: ")


def test_tpu_pod(tmp_path):
    args = ["--name=ouro", "--zone=us-east5-a", "--accelerator=v5p-64", "--project=p", "--spot",
            "--config=configs/demo.py", "--workdir=/mnt/shared/runs/demo", "--", ODD]
    create, tar, scp, install, start, follow, delete = dry_run("tpu_pod.sh", *args)
    assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
    assert {"ouro", "--zone=us-east5-a", "--project=p", "--accelerator-type=v5p-64",
            "--version=v2-alpha-tpuv5", "--spot"} <= set(create)
    assert tar[0] == "tar" and scp[4] == "scp" and "--worker=all" in scp
    for ssh in (install, start):
        assert ssh[4] == "ssh" and "--worker=all" in ssh
    assert follow[4] == "ssh" and "--worker=0" in follow
    assert delete[4] == "delete" and "--quiet" in delete
    assert "'jax[tpu]==0.10.2'" in flag(install, "--command")
    queued = dry_run("tpu_pod.sh", "--queued", *args)
    assert queued[0][:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    assert "--spot" in queued[0]
    assert queued[1][4] == "describe" and queued[-1][4] == "delete" and "--force" in queued[-1]
    reused = dry_run("tpu_pod.sh", "--reuse", "--keep", *args)
    assert [c[4] if c[0] == "gcloud" else c[0] for c in reused] == ["tar", "scp", "ssh", "ssh", "ssh"]

    # what a worker runs: the training command with exactly these arguments, detached, its status kept
    home = tmp_path / "worker"
    (home / "ouro_jax" / ".venv" / "bin").mkdir(parents=True)
    stub(home / "ouro_jax" / ".venv" / "bin" / "python",
         'printf "%s\\n" "$JAX_COMPILATION_CACHE_DIR" "$@" > "$HOME/argv"; echo training; exit 75')
    env = {**os.environ, "HOME": str(home)}
    subprocess.run(["bash", "-c", flag(start, "--command")], cwd=home, env=env, check=True, timeout=30)
    deadline = time.time() + 30
    while not (home / "ouro_jax_train.status").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert (home / "argv").read_text().splitlines() == [
        f"{home}/.cache/ouro_jax/xla", "-m", "ouro_jax.train", "--config=configs/demo.py",
        "--workdir=/mnt/shared/runs/demo", ODD]
    streamed = subprocess.run(["bash", "-c", flag(follow, "--command")], cwd=home, env=env,
                              capture_output=True, text=True, timeout=60)
    assert streamed.returncode == 75 and streamed.stdout == "training\n"


def test_xpk(tmp_path):
    tpu, = dry_run("xpk.sh", "--cluster=c", "--workload=w", "--tpu_type=v5p-128", "--num_slices=2",
                   "--config=configs/demo.py", "--workdir=/mnt/runs/demo", "--", ODD)
    assert tpu[:3] == ["xpk", "workload", "create"]
    assert {"--cluster=c", "--workload=w", "--tpu-type=v5p-128", "--num-slices=2", "--script-dir=.",
            "--base-docker-image=python:3.11", "--max-restarts=10"} <= set(tpu)
    gpu, = dry_run("xpk.sh", "--cluster=c", "--workload=w", "--device_type=h100-80gb-8", "--num_nodes=4",
                   "--config=configs/demo.py", "--workdir=/mnt/runs/demo", "--", ODD)
    assert {"--device-type=h100-80gb-8", "--num-nodes=4"} <= set(gpu) and "--tpu-type" not in str(gpu)

    # what a GPU pod runs, with the variables xpk sets
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub(bin_dir / "pip", 'printf "%s\\n" "$@" > "$OUT.pip"')
    stub(bin_dir / "python", 'printf "%s\\n" "$@" > "$OUT"')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(tmp_path / "argv"),
           "NNODES": "4", "NODE_RANK": "2", "JAX_COORDINATOR_ADDRESS": "w-slice-0-0.w",
           "JAX_COORDINATOR_PORT": "6002"}
    subprocess.run(["bash", "-c", flag(gpu, "--command")], env=env, check=True, timeout=30)
    assert (tmp_path / "argv").read_text().splitlines() == [
        "-m", "ouro_jax.train", "--config=configs/demo.py", "--workdir=/mnt/runs/demo", ODD,
        "--coordinator_address=w-slice-0-0.w:6002", "--num_processes=4", "--process_id=2"]
    pip = (tmp_path / "argv.pip").read_text().splitlines()
    assert pip == ["install", "-q", "-e", ".", "jax[cuda12]==0.10.2"]
    both = subprocess.run(["bash", os.path.join(REPO, "launch", "xpk.sh"), "--dry_run", "--cluster=c",
                           "--workload=w", "--tpu_type=t", "--device_type=d", "--config=c", "--workdir=w"],
                          capture_output=True, text=True)
    assert both.returncode == 1 and both.stderr.startswith("error: ")


def test_slurm():
    srun, requeue = dry_run("slurm_gpu.sbatch", "configs/demo.py", "/shared/runs/demo", ODD)
    assert srun[:3] == ["srun", "--kill-on-bad-exit=1", "--cpu-bind=none"]
    assert srun[-6:] == ["python", "-m", "ouro_jax.train", "--config=configs/demo.py",
                         "--workdir=/shared/runs/demo", ODD]
    assert requeue[:2] == ["scontrol", "requeue"]
    with open(os.path.join(REPO, "launch", "slurm_gpu.sbatch")) as f:
        directives = [line.split()[1] for line in f if line.startswith("#SBATCH")]
    assert {"--ntasks-per-node=8", "--gpus-per-node=8", "--signal=TERM@300", "--requeue"} <= set(directives)
