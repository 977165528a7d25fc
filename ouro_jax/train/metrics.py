"""Run metrics: `WORKDIR/metrics.jsonl` (one JSON object per log/eval step), TensorBoard event files
(`WORKDIR/tensorboard/`), a console progress line with ETA, and the summary of a run.

Per-loop arrays of the jitted steps (`ce_per_loop` [T], ...) become flat keys `loss_loop_1..T`, ...;
"step" always means the optimiser step.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping

import jax
import numpy as np

from ouro_jax import run

PER_LOOP_NAMES = {  # array metric [T] -> flat keys name_1..T
    "ce_per_loop": "loss_loop",
    "accuracy_per_loop": "accuracy_loop",
    "exit_pdf_per_loop": "exit_pdf_loop",
    "answer_accuracy_per_loop": "answer_accuracy_loop",
}


def flatten(metrics: Mapping[str, np.ndarray], prefix: str = "") -> dict[str, float]:
    """Device metrics -> flat floats; per-loop arrays become `<name>_loop_<t>` (t = 1..T)."""
    flat = {}
    for name, value in metrics.items():
        value = np.asarray(value)
        if name in PER_LOOP_NAMES:
            for t, v in enumerate(value, start=1):
                flat[f"{prefix}{PER_LOOP_NAMES[name]}_{t}"] = float(v)
        else:
            flat[prefix + name] = float(value) if value.ndim == 0 else value.tolist()
    return flat


class MetricsWriter:
    """Appends to metrics.jsonl and TensorBoard; on resume, drops records after the restored step so
    the file reads as one uninterrupted run."""

    def __init__(self, workdir: str, *, resumed_step: int | None, is_primary: bool = True):
        self.enabled = is_primary
        self.path = os.path.join(workdir, run.METRICS)
        if not self.enabled:
            return
        if resumed_step is not None:
            self._truncate_after(resumed_step)
        from tensorboardX import SummaryWriter

        self.tensorboard = SummaryWriter(os.path.join(workdir, run.TENSORBOARD))
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

    def add_eval_figures(self, step: int, per_loop: Mapping[str, np.ndarray]) -> None:
        """The evaluation's per-loop CE / accuracy and exit-loop histogram as TensorBoard images (the
        figures of `python -m ouro_jax.evaluate`); skipped when matplotlib (the `eval` extra) is absent."""
        if not self.enabled:
            return
        try:
            from ouro_jax.evaluate.plots import loop_figures
        except ImportError:
            return
        for name, figure in loop_figures(per_loop, title=f"step {step}").items():
            self.tensorboard.add_figure(f"eval/{name}", figure, step)
        self.tensorboard.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tensorboard.close()


def headline(step_metrics: Mapping) -> dict[str, float]:
    """The figures of every progress line, fetched in one host transfer, named as in metrics.jsonl: the
    `loss` (the training objective; Stage I: exit-pdf-weighted CE - beta * entropy, which goes below zero
    as the entropy term grows), the exit-pdf-weighted CE and the exit entropy."""
    loss, weighted_ce, entropy = jax.device_get(
        (step_metrics["loss"], step_metrics["weighted_ce"], step_metrics["entropy"]))
    return {"loss": float(loss), "weighted_ce": float(weighted_ce), "entropy": float(entropy)}


def _figures(headline: Mapping[str, float]) -> str:
    return (f"loss {headline['loss']:.4f} (exit-weighted CE {headline['weighted_ce']:.4f}, "
            f"exit entropy {headline['entropy']:.3f})")


class Progress:
    """`step 120/1500 [###-------] 8%  loss ... (exit-weighted CE ..., exit entropy ...)  12.3 steps/s
    ETA 1m52s` on stderr: redrawn in place on a terminal, otherwise a line every `interval_s` seconds
    (and at the last step). Silent unless `enabled` (process 0 of a multi-process run)."""

    def __init__(self, total_steps: int, start_step: int, interval_s: float = 30.0, *, enabled: bool = True):
        self.enabled = enabled
        self.total, self.start = total_steps, start_step
        self.t0 = self.last = time.perf_counter()
        self.interval_s = interval_s
        self.tty = sys.stderr.isatty()

    def update(self, step: int, headline: Mapping[str, float]) -> None:
        now = time.perf_counter()
        if not self.enabled or (not self.tty and now - self.last < self.interval_s and step != self.total):
            return
        self.last = now
        rate = (step - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        frac = step / max(self.total, 1)
        bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
        line = (f"step {step}/{self.total} [{bar}] {100 * frac:3.0f}%  {_figures(headline)}  "
                f"{rate:.2f} steps/s  ETA {_duration(eta)}")
        sys.stderr.write(("\r" + line) if self.tty else (line + "\n"))
        sys.stderr.flush()

    def note(self, text: str) -> None:
        """A line of its own (e.g. a held-out evaluation), below the progress line."""
        if self.enabled:
            sys.stderr.write(("\r\033[K" if self.tty else "") + text + "\n")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")


def summary(workdir: str) -> str:
    """The last logged figures of a run: the loss and its parts, then per loop the held-out answer
    accuracy (task data) or the held-out loss and perplexity (text)."""
    path = os.path.join(workdir, run.METRICS)
    records = []
    if os.path.exists(path):
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
    if not records:
        return "no step was logged yet"
    last = records[-1]
    evals = [r for r in records if "eval_loss_loop_1" in r]
    figures = {"loss": last["loss"], "weighted_ce": last["weighted_ce"], "entropy": last["entropy"]}
    parts = [f"step {last['step']}: {_figures(figures)}"]
    if evals:
        parts.append(held_out(evals[-1]))
    return "; ".join(parts)


def held_out(record: Mapping[str, float]) -> str:
    """One logged evaluation (`step` and the `eval_*` keys) per loop: the answer accuracy (task data) or
    the loss and perplexity (text)."""
    loops = range(1, 1 + sum(1 for k in record if k.startswith("eval_loss_loop_")))
    if record.get("eval_num_answers"):
        per_loop = "  ".join(f"loop {t}: {100 * record[f'eval_answer_accuracy_loop_{t}']:.1f}%"
                             for t in loops)
        return f"held-out answer accuracy (step {record['step']}) per loop: {per_loop}"
    per_loop = "  ".join(f"loop {t}: {record[f'eval_loss_loop_{t}']:.3f} "
                         f"(ppl {math.exp(min(record[f'eval_loss_loop_{t}'], 50.0)):.1f})" for t in loops)
    return f"held-out loss (step {record['step']}) per loop: {per_loop}"


def _duration(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
