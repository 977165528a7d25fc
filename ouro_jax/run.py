"""The run directory: the one place that knows where a run keeps what.

    RUN/config.json                        the training config (ml_collections JSON); `model` holds the
                                           OuroConfig fields (an imported checkpoint has only `model`)
    RUN/checkpoints/<step>/params          Orbax: the model parameters (a pure dict)
    RUN/checkpoints/<step>/train           Orbax: optimiser step, optimiser state, RNG
    RUN/checkpoints/<step>/data_iter       grain iterator state, one JSON file per process
    RUN/config_changes.jsonl               config changes accepted on resume (`--config_change=allow`)
    RUN/train.lock                         host and pid of the training process that holds the run
    RUN/metrics.jsonl, RUN/tensorboard/    written by training

Training, `from_pretrained` of a run, import and export all go through these functions. Orbax writes each
step into a temporary directory and renames it when complete, so a crash mid-save never leaves a step
that `latest_step` would pick up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from ouro_jax.model.config import RUNTIME_FIELDS, OuroConfig

CONFIG = "config.json"
CONFIG_CHANGES = "config_changes.jsonl"
LOCK = "train.lock"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
ITEMS = ("params", "train", "data_iter")


class RunError(ValueError):
    """A path that is not what the caller needs (not a run, no checkpoint, unreadable config)."""


@dataclasses.dataclass(frozen=True)
class Location:
    """Where a user-given path points.

    kind: "run" (a run directory or its checkpoints/), "step" (RUN/checkpoints/<step>) or "hf" (a Hugging
    Face Ouro directory); root: the run or HF directory; step_dir / step: the chosen checkpoint (the
    latest complete one for "run"; None when a run has none yet, and for "hf").
    """

    kind: str
    root: Path
    step_dir: Path | None = None
    step: int | None = None


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir).absolute() / CHECKPOINTS


def latest_step(run_dir: str | os.PathLike) -> int | None:
    """The latest complete checkpoint step of a run, or None (Orbax gives a step its plain number only
    when the step is complete)."""
    directory = checkpoint_dir(run_dir)
    steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir()] if (
        directory.is_dir()) else []
    return max(steps, default=None)


def read_json(path: Path, error: type[RunError] = RunError) -> dict:
    """A JSON object from `path`; anything else raises `error` (one line naming the file)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise error(f"{path}: not readable as JSON ({err})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object")
    return data


def locate(path: str | os.PathLike) -> Location:
    """Classify `path` (a run, a step of a run, or a Hugging Face directory).

    Raises FileNotFoundError when `path` is not a directory, RunError when it holds no config.json.
    """
    directory = Path(path).absolute()
    if not directory.is_dir():
        raise FileNotFoundError(f"{path}: no such directory")
    if (directory / "params").is_dir():  # RUN/checkpoints/<step>
        root = directory.parent.parent
        step = int(directory.name) if directory.name.isdigit() else None
        return Location("step", root, directory, step)
    root = directory.parent if directory.name == CHECKPOINTS else directory
    config_file = root / CONFIG
    if not config_file.is_file():
        raise RunError(f"{path}: no {CONFIG} (expected an ouro_jax run, one of its checkpoint steps, or a "
                       "Hugging Face Ouro directory)")
    if not isinstance(read_json(config_file).get("model"), dict):
        if root != directory:
            raise RunError(f"{config_file}: an ouro_jax run config needs a `model` key")
        return Location("hf", root)
    step = latest_step(root)
    return Location("run", root, None if step is None else checkpoint_dir(root) / str(step), step)


def tokenizer_of(path: str | os.PathLike) -> str | None:
    """The tokenizer (a `tokenizer.load` name or path) the model at `path` reads text with: the
    tokenizer.json of its directory (a Hugging Face export, or a run that holds one), else the one its
    training config names (`data.tokenizer`), else the bundled "ouro" (an imported checkpoint). None for
    a run trained on a synthetic task, which has no text tokenizer."""
    from ouro_jax.data.tasks import TASKS

    location = locate(path)
    if (location.root / "tokenizer.json").is_file():
        return str(location.root)
    data = read_config(location.root).get("data") if location.kind != "hf" else None
    if data is None:
        return "ouro"
    return None if data.get("source") in TASKS else data.get("tokenizer", "ouro")


def read_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """The config a run was made with (RUN/config.json; `path` may be the run or one of its steps)."""
    location = locate(path)
    if location.kind == "hf":
        raise RunError(f"{path}: a Hugging Face directory, not an ouro_jax run")
    return ml_collections.ConfigDict(read_json(location.root / CONFIG))


def write_config(run_dir: str | os.PathLike, config: ml_collections.ConfigDict | dict) -> Path:
    """Write RUN/config.json atomically (a temporary file renamed over it)."""
    path = Path(run_dir) / CONFIG
    if isinstance(config, ml_collections.ConfigDict):
        text = config.to_json_best_effort(indent=2, sort_keys=True)
    else:
        text = json.dumps(config, indent=2, sort_keys=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)
    return path


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _as_json(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


def config_changes(run_dir: str | os.PathLike, config: ml_collections.ConfigDict) -> dict[str, tuple]:
    """{key: (recorded value, new value)} for every key where `config` differs from RUN/config.json."""
    old, new = _flat(read_json(Path(run_dir) / CONFIG)), _flat(_as_json(config))
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def check_resume(run_dir: str | os.PathLike, config: ml_collections.ConfigDict, *,
                 allow_change: bool = False) -> None:
    """Refuse (RunError, nothing written) a training into `run_dir` that cannot continue it: a path that
    is a file, a directory holding something else, a changed model shape, or any other changed key
    unless `allow_change` (then `record_config` logs the change beside the original config)."""
    if re.match(r"^[a-z][a-z0-9+.-]*://", str(run_dir)):
        raise RunError(f"--workdir {run_dir}: URLs are not supported; give a directory that every host "
                       "sees (NFS, Filestore, or the bucket mounted with gcsfuse)")
    directory = Path(run_dir)
    if directory.exists() and not directory.is_dir():
        raise RunError(f"--workdir {run_dir} is a file, not a run directory")
    if not (directory / CONFIG).is_file():
        return
    recorded = read_json(directory / CONFIG)
    if not isinstance(recorded.get("model"), dict) or "total_steps" not in recorded:
        raise RunError(f"--workdir {run_dir} holds {CONFIG} of something else (an export or an imported "
                       "checkpoint); train into a new directory and use --config.init_from for weights")
    changes = config_changes(run_dir, config)
    shape = {k: v for k, v in changes.items() if k.startswith("model.") and k.split(".", 1)[1] not in
             RUNTIME_FIELDS}
    describe = lambda c: "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(c.items())[:6]) + (
        f" (and {len(c) - 6} more)" if len(c) > 6 else "")
    if shape:
        raise RunError(f"--workdir {run_dir} holds a run of another model ({describe(shape)}); use a new "
                       "workdir (with --config.init_from to start from its weights)")
    if changes and not allow_change:
        raise RunError(f"--workdir {run_dir} holds a run with another config ({describe(changes)}); pass "
                       "--config_change=allow to continue it with these changes (they are recorded)")


def record_config(run_dir: str | os.PathLike, config: ml_collections.ConfigDict, *, step: int) -> None:
    """Write RUN/config.json for a new run; for a resumed run whose config changed, append the change
    (step, time, {key: [old, new]}) to RUN/config_changes.jsonl and keep the original config.json."""
    directory = Path(run_dir)
    if not (directory / CONFIG).is_file():
        write_config(directory, config)
        return
    changes = config_changes(directory, config)
    if changes:
        entry = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "changes": {k: list(v) for k, v in changes.items()}}
        with open(directory / CONFIG_CHANGES, "a") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def lock(run_dir: str | os.PathLike, *, primary: bool = True) -> Iterator[None]:
    """Hold RUN/train.lock (host, pid) while training. A run held by a live process is refused with one line
    naming the holder; a lock left by a dead process on this host is taken over. Only the primary
    process of a multi-process run takes the lock (the others share it)."""
    directory = Path(run_dir)
    if not primary:
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):
                holder = {}
            if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not _alive(
                    holder["pid"]):
                path.unlink(missing_ok=True)  # stale: its process is gone; race for it again
                continue
            raise RunError(f"--workdir {run_dir} is in use by pid {holder.get('pid', '?')} on host "
                           f"{holder.get('host', '?')} (if that process is gone, delete {path})") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()) == me:
                path.unlink()


def model_config(path: str | os.PathLike, **runtime: Any) -> OuroConfig:
    """The OuroConfig of a run (its `model` key), with runtime fields (dtype, ...) overridden."""
    fields = read_config(path).model.to_dict()
    names = {f.name for f in dataclasses.fields(OuroConfig)}
    try:
        return OuroConfig(**{**{k: v for k, v in fields.items() if k in names}, **runtime})
    except (TypeError, ValueError) as err:
        raise RunError(f"{path}: {CONFIG} `model`: {err}") from None


def checkpoint_step_dir(path: str | os.PathLike) -> Path:
    """RUN/checkpoints/<step> of a step, or of a run's latest complete checkpoint (FileNotFoundError
    when it has none, RunError for a Hugging Face directory)."""
    location = locate(path)
    if location.kind == "hf":
        raise RunError(f"{path}: a Hugging Face directory holds no Orbax checkpoint")
    if location.step_dir is None:
        raise FileNotFoundError(f"{path}: no complete checkpoint under {checkpoint_dir(location.root)}")
    return location.step_dir


class StopRequests:
    """SIGTERM / SIGINT set a flag a training loop reads at step boundaries (`check`: all processes
    agree); a second SIGINT restores Python's handler and interrupts at once. Handlers are restored on
    `close`."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested: str | None = None
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame):
        del frame
        if self.requested and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def check(self) -> bool:
        if jax.process_count() == 1:
            return self.requested is not None
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.array(self.requested is not None))))

    def close(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def restore_params(path: str | os.PathLike, abstract_params) -> dict:
    """Parameters of a run (latest checkpoint) or of one of its steps, in `abstract_params`' shapes,
    dtypes and shardings (so any mesh; a leaf without a sharding takes the saved one, which needs the
    saving topology). Layer counts must match (upcycle after restoring otherwise)."""
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(checkpoint_step_dir(path) / "params", abstract_params)


def save_params(run_dir: str | os.PathLike, params, step: int = 0) -> Path:
    """Write `params` as RUN/checkpoints/<step>/params (a run other runs can `init_from`)."""
    with Checkpointer(run_dir, max_to_keep=None, async_save=False, items=("params",)) as checkpointer:
        checkpointer.manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
    return checkpoint_dir(run_dir) / str(step)


class Checkpointer:
    """Orbax CheckpointManager over RUN/checkpoints: params, train (a pytree), data_iter (grain)."""

    def __init__(self, run_dir: str | os.PathLike, *, max_to_keep: int | None, async_save: bool = True,
                 items: tuple[str, ...] = ITEMS):
        self.directory = checkpoint_dir(run_dir)
        step = latest_step(run_dir)
        if step is not None:  # refuse before Orbax starts its background threads (clean exit on error)
            self._check_process_count(step)
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=items,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True,
                cleanup_tmp_directories=True))

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, train, data_iter) -> None:
        """Start saving at `step` (the iterator position is captured now)."""
        self.manager.save(step, force=True, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            train=ocp.args.StandardSave(train),
            data_iter=grain.checkpoint.CheckpointSave(data_iter)))

    def restore(self, step: int, abstract_params, abstract_train, data_iter) -> tuple[Any, Any]:
        """(params, train) in the abstract trees' shapes and shardings; sets `data_iter`'s position.

        Raises RunError when the step was saved by another number of processes (each process restores
        its own iterator position, so the count must match)."""
        self._check_process_count(step)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params),
            train=ocp.args.StandardRestore(abstract_train),
            data_iter=grain.checkpoint.CheckpointRestore(data_iter)))
        return restored["params"], restored["train"]

    def _check_process_count(self, step: int) -> None:
        files = (self.directory / str(step) / "data_iter").glob("process_*-of-*.json")
        saved = {int(m.group(1)) for f in files if (m := re.fullmatch(r"process_\d+-of-(\d+)\.json", f.name))}
        if saved and saved != {jax.process_count()}:
            count = ", ".join(map(str, sorted(saved)))
            raise RunError(
                f"checkpoint {step} of {self.directory.parent} was saved by {count} processes, this run has "
                f"{jax.process_count()}: resume with {count} processes (each restores its own data position) "
                f"or train into a new --workdir with --config.init_from={self.directory.parent}")

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
