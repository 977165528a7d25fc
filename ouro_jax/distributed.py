"""Start of a multi-process run (several hosts, or several processes on one host): which process this
is, how many there are, and where their coordinator listens.

    from ouro_jax import distributed      # defines --coordinator_address, --num_processes, ...
    def main(argv):
        distributed.initialize_from_flags()   # before anything touches a device
        ...

Where the settings come from, first match wins:
  explicit   --coordinator_address=HOST:PORT --num_processes=N --process_id=I (or the environment
             variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID; an address without a
             port takes JAX_COORDINATOR_PORT);
  slurm      a task of `srun` (SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID;
             one process per task, each seeing the GPU of its SLURM_LOCALID);
  openmpi    a rank of `mpirun` (OMPI_MCA_orte_hnp_uri, OMPI_COMM_WORLD_SIZE);
  gke_tpu    a TPU slice on GKE (TPU_WORKER_HOSTNAMES or TPU_PROCESS_ADDRESSES listing several hosts,
             or MEGASCALE_NUM_SLICES > 1 for several slices);
  cloud_tpu  a Cloud TPU VM (libtpu installed, a Google device on the PCI bus): JAX asks the VM's
             metadata server for the workers of the slice (a single-host TPU VM becomes a one-process
             run; a machine JAX does not find to be a TPU VM, a single process);
  single     none of these, or one process: nothing to start.
JAX's own cluster detection fills in what the environment implies; this module decides only whether to
start, checks explicit settings, and turns JAX's failures into one line: a process id out of range, a
malformed address, or processes that do not all reach the coordinator within `timeout_s` (JAX would
otherwise abort the process with a C++ stack trace).
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import re
import sys
import threading
import time
from collections.abc import Mapping

import jax
from absl import flags, logging

ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}
TIMEOUT_ENV = "JAX_COORDINATOR_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 60
TIMEOUT_STATUS = 1
"""Exit status when the processes do not all connect in time (a usage error: settings or launch)."""

_GOOGLE_PCI_VENDOR = "0x1ae0"
_SLURM = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")

_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None,
    f"HOST:PORT where process 0 serves the distributed start (env {ENV['coordinator_address']}); "
    "unset: detected from SLURM, Open MPI or the TPU environment, or a single process.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, f"Number of processes of the run (env {ENV['num_processes']}).", lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, f"This process's index, 0..num_processes-1 (env {ENV['process_id']}).",
    lower_bound=0)
_TIMEOUT_S = flags.DEFINE_integer(
    "coordinator_timeout_s", None,
    f"Seconds every process may take to reach the coordinator before the run stops with an error "
    f"(env {TIMEOUT_ENV}; default {DEFAULT_TIMEOUT_S}).", lower_bound=1)


class DistributedError(ValueError):
    """Settings that cannot start the run (the message is one line)."""


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process starts. method: one of "explicit", "slurm", "openmpi", "gke_tpu", "cloud_tpu",
    "single" (see the module docstring); the other fields are None where JAX detects them."""

    method: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    @property
    def multi_process(self) -> bool:
        return self.method != "single"


def _int(value, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DistributedError(f"{name} must be an integer, got {value!r}") from None


def _check_address(address: str) -> None:
    match = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^\s:/\[\]]+):(\d+)", address)
    if not match or not 0 < int(match.group(2)) < 65536:
        raise DistributedError(f"--coordinator_address must be HOST:PORT (port 1..65535), got {address!r}")


def _explicit(address: str | None, count: int | None, index: int | None) -> Launch:
    if count is None:
        raise DistributedError("--num_processes is needed with --coordinator_address/--process_id")
    if count < 1:
        raise DistributedError(f"--num_processes must be at least 1, got {count}")
    if index is None and count > 1:
        raise DistributedError(f"--process_id is needed: which of the {count} processes this is "
                               f"(0..{count - 1})")
    index = 0 if index is None else index
    if not 0 <= index < count:
        raise DistributedError(f"--process_id={index} is out of range for --num_processes={count} "
                               f"(ids are 0..{count - 1})")
    if count == 1:
        return Launch("single", None, 1, 0)
    if address is None:
        raise DistributedError(f"--coordinator_address=HOST:PORT is needed for {count} processes "
                               "(the host of process 0 and a free port)")
    _check_address(address)
    return Launch("explicit", address, count, index)


def _maybe_cloud_tpu_vm() -> bool:
    """libtpu installed and a Google device on the PCI bus: maybe a Cloud TPU VM (JAX's metadata query
    decides; a Google network card on a GPU VM looks the same from here). Not when JAX_PLATFORMS
    leaves TPUs out (e.g. `cpu`)."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if importlib.util.find_spec("libtpu") is None or (platforms and "tpu" not in platforms.split(",")):
        return False
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def _hosts(value: str | None) -> int:
    return len([h for h in (value or "").split(",") if h.strip()])


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, *, environ: Mapping[str, str] = os.environ,
            tpu_vm: bool | None = None) -> Launch:
    """The `Launch` of this process from explicit arguments, then `environ` (see the module docstring).

    Pure apart from looking for a TPU VM (`tpu_vm=None`: libtpu and a Google PCI device). Raises
    DistributedError on settings that cannot work.
    """
    address = coordinator_address or environ.get(ENV["coordinator_address"]) or None
    if address and environ.get("JAX_COORDINATOR_PORT") and not re.search(r":\d+$", address):
        address = f"{address}:{environ['JAX_COORDINATOR_PORT']}"  # host and port apart (xpk on GPUs)
    count = num_processes if num_processes is not None else _int(
        environ.get(ENV["num_processes"]), ENV["num_processes"])
    index = process_id if process_id is not None else _int(environ.get(ENV["process_id"]), ENV["process_id"])
    if (address, count, index) != (None, None, None):
        return _explicit(address, count, index)
    if all(k in environ for k in _SLURM):
        count = _int(environ["SLURM_NTASKS"], "SLURM_NTASKS")
        index = _int(environ["SLURM_PROCID"], "SLURM_PROCID")
        return Launch("slurm" if count > 1 else "single", None, count, index)
    if "OMPI_MCA_orte_hnp_uri" in environ:
        count = _int(environ.get("OMPI_COMM_WORLD_SIZE"), "OMPI_COMM_WORLD_SIZE")
        return Launch("openmpi" if count is None or count > 1 else "single", None, count,
                      _int(environ.get("OMPI_COMM_WORLD_RANK"), "OMPI_COMM_WORLD_RANK"))
    hosts = _hosts(environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES"))
    if hosts > 1 or (_int(environ.get("MEGASCALE_NUM_SLICES"), "MEGASCALE_NUM_SLICES") or 1) > 1:
        return Launch("gke_tpu")
    if _maybe_cloud_tpu_vm() if tpu_vm is None else tpu_vm:
        return Launch("cloud_tpu")
    return Launch("single", None, 1, 0)


def _timeout_message(launch: Launch, timeout_s: int) -> str:
    who = (f"process {launch.process_id} of {launch.num_processes}" if launch.num_processes
           else f"this process ({launch.method})")
    where = launch.coordinator_address or "the coordinator JAX detected"
    return (f"distributed start: {who} did not connect to all processes through {where} within "
            f"{timeout_s} s; start every process with the same --coordinator_address (the host of process "
            f"0, reachable from all), --num_processes and its own --process_id, or raise "
            f"--coordinator_timeout_s")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: int = DEFAULT_TIMEOUT_S) -> Launch:
    """Start this process's part of a multi-process run (`jax.distributed.initialize`); a no-op for a
    single process and when already started. Call before anything touches a device.

    If not every process has connected within `timeout_s` seconds, prints one line `error: ...` on stderr
    and exits the process with status `TIMEOUT_STATUS` (JAX would abort it later with a stack trace);
    bad settings raise DistributedError before anything is started.
    """
    launch = resolve(coordinator_address, num_processes, process_id)
    if not launch.multi_process or jax.distributed.is_initialized():
        return launch
    deadline = threading.Timer(timeout_s, _give_up, args=(_timeout_message(launch, timeout_s),))
    deadline.daemon = True
    deadline.start()
    start = time.perf_counter()
    try:
        jax.distributed.initialize(
            launch.coordinator_address, launch.num_processes, launch.process_id,
            initialization_timeout=timeout_s + 60,  # JAX's own deadline aborts; ours fires first
            cluster_detection_method="deactivate" if launch.method == "explicit" else None)
    except ValueError as err:  # JAX's detection found no cluster (or an incomplete one)
        if launch.method == "cloud_tpu":  # not a TPU VM after all
            return Launch("single", None, 1, 0)
        raise DistributedError(f"distributed start ({launch.method}): {err}") from None
    except RuntimeError as err:  # "must be called before any JAX computations are executed"
        raise DistributedError(f"distributed start: {err}") from None
    finally:
        deadline.cancel()
    logging.info("jax.distributed (%s): process %d of %d connected in %.1f s", launch.method,
                 jax.process_index(), jax.process_count(), time.perf_counter() - start)
    return launch


def _give_up(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(TIMEOUT_STATUS)


def initialize_from_flags() -> Launch:
    """`initialize` with --coordinator_address, --num_processes, --process_id, --coordinator_timeout_s
    (each falling back to its environment variable)."""
    timeout_s = _TIMEOUT_S.value or _int(os.environ.get(TIMEOUT_ENV), TIMEOUT_ENV) or DEFAULT_TIMEOUT_S
    return initialize(_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                      timeout_s=timeout_s)


def describe(mesh: jax.sharding.Mesh | None = None) -> str:
    """One line: process index / count, local / global devices (platform), and the mesh axes."""
    local, total = len(jax.local_devices()), jax.device_count()
    line = (f"process {jax.process_index()} of {jax.process_count()}: {local} local of {total} "
            f"{jax.devices()[0].platform} devices")
    if mesh is not None:
        line += "; mesh " + " ".join(f"{name}={size}" for name, size in mesh.shape.items())
    return line
