"""What every benchmark shares: timing, markdown tables, its result and the JSON file of results."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class Result:
    """One benchmark's outcome: `text` (markdown: tables and verdict lines, printed) and `figures` (its
    measured quantities, JSON-serialisable, stored under the benchmark's name by `write_json`)."""

    text: str
    figures: dict[str, Any]


SHAPES = ("cpu_benchmark", "tiny")  # `--shape`: the figures' model, and a tiny one for smoke runs


def model_config(shape: str, **overrides: Any):
    """The benchmarks' OuroConfig: `shape` "cpu_benchmark" (`model.config.cpu_benchmark`, every figure of
    docs/benchmarks.md) or "tiny" (`model.config.tiny`: the same code in seconds, for smoke runs)."""
    from ouro_jax.model.config import PRESETS

    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r} must be one of {SHAPES}")
    return PRESETS[shape](**overrides)


def wall(fn: Callable[[], object]) -> float:
    """Wall seconds of `fn()` (which must block until its result is ready)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall seconds of `repeats` calls of `fn()`."""
    return statistics.median(wall(fn) for _ in range(repeats))


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def environment() -> dict[str, Any]:
    """The software and machine a figure was measured on."""
    import jax

    devices = jax.devices()
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "jax": jax.__version__,
            "platform": devices[0].platform, "device_kind": devices[0].device_kind,
            "devices": len(devices), "cpu_count": os.cpu_count(), "python": platform.python_version()}


def write_json(path: str | os.PathLike, name: str, result: Result, env: dict[str, Any]) -> None:
    """Add `{name: {"environment": env, "figures": ...}}` to the JSON object in `path` (created if
    missing; other benchmarks' entries are kept), written atomically."""
    path = Path(path)
    data = json.loads(path.read_text()) if path.is_file() else {}
    if not isinstance(data, dict):
        raise ValueError(f"--json={path} holds no JSON object")
    data[name] = {"environment": env, "figures": result.figures}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
