"""Run metrics: `WORKDIR/metrics.jsonl` (one JSON object per log/eval step), TensorBoard event files
(`WORKDIR/tensorboard/`), and a console progress line with ETA."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping

import numpy as np

PER_STEP_NAMES = {  # array metric [T] -> flat keys name_step_1..T
    "ce_per_step": "loss_step",
    "accuracy_per_step": "accuracy_step",
    "exit_pdf_per_step": "exit_pdf_step",
    "answer_accuracy_per_step": "answer_accuracy_step",
}


def flatten(metrics: Mapping[str, np.ndarray], prefix: str = "") -> dict[str, float]:
    """Device metrics -> flat floats; per-step arrays become `<name>_step_<t>` (t 1-based)."""
    flat = {}
    for name, value in metrics.items():
        value = np.asarray(value)
        if name in PER_STEP_NAMES:
            for t, v in enumerate(value, start=1):
                flat[f"{prefix}{PER_STEP_NAMES[name]}_{t}"] = float(v)
        else:
            flat[prefix + name] = float(value) if value.ndim == 0 else value.tolist()
    return flat


class MetricsWriter:
    """Appends to metrics.jsonl and TensorBoard; on resume, drops records after the restored step so
    the file reads as one uninterrupted run."""

    def __init__(self, workdir: str, *, resumed_step: int | None, is_primary: bool = True):
        self.enabled = is_primary
        self.path = os.path.join(workdir, "metrics.jsonl")
        if not self.enabled:
            return
        if resumed_step is not None:
            self._truncate_after(resumed_step)
        from tensorboardX import SummaryWriter

        self.tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))
        self.file = open(self.path, "a")  # closed in close()

    def _truncate_after(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)

    def write(self, step: int, record: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **record}) + "\n")
        self.file.flush()
        for key, value in record.items():
            if isinstance(value, float):
                self.tensorboard.add_scalar(key, value, step)
        self.tensorboard.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tensorboard.close()


class Progress:
    """`step 120/1500 [###-------] 8%  loss 1.234  12.3 steps/s  ETA 1m52s` on stderr."""

    def __init__(self, total_steps: int, start_step: int):
        self.total, self.start = total_steps, start_step
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, step: int, loss: float, force: bool = False) -> None:
        if not (self.tty or force):
            return
        done = step - self.start
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        frac = step / max(self.total, 1)
        bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
        line = (f"step {step}/{self.total} [{bar}] {100 * frac:3.0f}%  loss {loss:.4f}  "
                f"{rate:.2f} steps/s  ETA {_duration(eta)}")
        sys.stderr.write(("\r" + line) if self.tty else (line + "\n"))
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def _duration(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
