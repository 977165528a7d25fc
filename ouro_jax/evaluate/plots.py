"""Figures of a per-loop evaluation (arXiv:2510.25741 §5.4.1, Fig. 5), drawn with matplotlib's object API
(no pyplot state, no display needed), so they can be saved as PNG, shown in a notebook, or logged with
tensorboardX's `SummaryWriter.add_figure(tag, figure, step)`.

  loop_figures(metrics)    per-loop CE / accuracy and the gate's exit distribution, from the per-loop arrays
                           of the training evaluation or of `metrics.summarize`;
  figures(result)          the same plus accuracy against mean depth (one curve per exit rule) and the
                           exit-loop histograms of Q-exit, from `metrics.summarize`'s dict;
  save(figures, directory) PNG files.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

COLORS = {"static": "black", "q_exit": "tab:blue", "hidden_delta": "tab:orange",
          "hidden_delta_relative": "tab:green"}
NAMES = {"static": "static exit (loop 1..L)", "q_exit": "Q-exit (gate CDF >= q)",
         "hidden_delta": "hidden-state change ||h_t - h_t-1|| < eps",
         "hidden_delta_relative": "relative change ||h_t - h_t-1|| / ||h_t-1|| < eps"}


def _loops(n: int) -> np.ndarray:
    return np.arange(1, n + 1)


def _title(what: str, context: str) -> str:
    return f"{what}\n{context}" if context else what


def _mark_trained(ax, trained_loops: int | None, num_loops: int) -> None:
    """A dashed line after the trained T when the evaluation extrapolates past it."""
    if trained_loops is not None and num_loops > trained_loops:
        ax.axvline(trained_loops + 0.5, color="grey", linestyle="--", linewidth=1)
        ax.text(trained_loops + 0.55, 0.98, "extrapolated", transform=ax.get_xaxis_transform(),
                va="top", fontsize=8, color="grey")


def per_loop_figure(metrics: Mapping[str, Any], *, trained_loops: int | None = None,
                    title: str = "") -> Figure:
    """CE per loop (left) and token / answer accuracy per loop (right).

    metrics: `ce_per_loop` [L] and `accuracy_per_loop` [L]; optional `answer_accuracy_per_loop` [L] (None or
    absent without answers).
    """
    ce = np.asarray(metrics["ce_per_loop"], float)
    loops = _loops(len(ce))
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    ax_ce, ax_acc = fig.subplots(1, 2)
    ax_ce.plot(loops, ce, "o-", color="tab:red")
    ax_ce.set(xlabel="loop", ylabel="cross-entropy (nats / token)", title="Cross-entropy after each loop",
              xticks=loops)
    accuracy = 100 * np.asarray(metrics["accuracy_per_loop"], float)
    ax_acc.plot(loops, accuracy, "o-", label="token accuracy (every scored target)")
    answers = metrics.get("answer_accuracy_per_loop")
    if answers is not None:
        ax_acc.plot(loops, 100 * np.asarray(answers, float), "s-", label="answer accuracy")
    ax_acc.set(xlabel="loop", ylabel="accuracy (%)", title="Accuracy after each loop", xticks=loops)
    ax_acc.legend(loc="best", fontsize=8)
    for ax in (ax_ce, ax_acc):
        ax.grid(alpha=0.3)
        _mark_trained(ax, trained_loops, len(ce))
    fig.suptitle(_title("Per-loop evaluation", title))
    return fig


def exit_histogram_figure(exit_pdf: Sequence[float],
                          rule_histograms: Mapping[str, Sequence[float]] | None = None, *,
                          trained_loops: int | None = None, title: str = "") -> Figure:
    """Grouped bars per loop: the gate's mean exit probability p(t) and, optionally, the fraction of tokens
    that each named rule (e.g. `Q-exit q=0.5`) sends out at each loop."""
    groups = {"gate exit distribution p(t) (mean)": np.asarray(exit_pdf, float)}
    groups.update({name: np.asarray(h, float) for name, h in (rule_histograms or {}).items()})
    loops = _loops(len(groups[next(iter(groups))]))
    width = 0.8 / len(groups)
    fig = Figure(figsize=(7, 3.8), layout="constrained")
    ax = fig.subplots()
    for k, (name, values) in enumerate(groups.items()):
        ax.bar(loops - 0.4 + width * (k + 0.5), 100 * values, width, label=name)
    ax.set(xlabel="exit loop", ylabel="tokens exiting (%)", xticks=loops,
           title=_title("Where tokens exit", title))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    _mark_trained(ax, trained_loops, len(loops))
    return fig


def loop_figures(metrics: Mapping[str, Any], *, trained_loops: int | None = None,
                 title: str = "") -> dict[str, Figure]:
    """{"per_loop": per_loop_figure, "exit_histogram": exit_histogram_figure} from per-loop arrays:
    `ce_per_loop`, `accuracy_per_loop`, `exit_pdf_per_loop` and optionally `answer_accuracy_per_loop`
    (the training evaluation's names, or `metrics.summarize`'s)."""
    return {"per_loop": per_loop_figure(metrics, trained_loops=trained_loops, title=title),
            "exit_histogram": exit_histogram_figure(metrics["exit_pdf_per_loop"], trained_loops=trained_loops,
                                                    title=title)}


def accuracy_vs_depth_figure(result: Mapping[str, Any], *, title: str = "") -> Figure:
    """Accuracy against mean depth (loops per token), one curve per exit rule (Fig. 5 of the paper).
    Answer accuracy over the answers when the data has answers, else token accuracy."""
    answers = result["answer_accuracy_per_loop"] is not None
    accuracy, depth = ("answer_accuracy", "answer_mean_depth") if answers else ("accuracy", "mean_depth")
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for kind, name in NAMES.items():
        rules = sorted((r for r in result["rules"] if r["kind"] == kind), key=lambda r: r[depth])
        if not rules:
            continue
        x = [r[depth] for r in rules]
        y = [100 * r[accuracy] for r in rules]
        style = "s-" if kind == "static" else "o-"
        ax.plot(x, y, style, color=COLORS[kind], label=name, markersize=4 if kind != "static" else 6)
        if kind == "static":
            for r, xi, yi in zip(rules, x, y, strict=True):
                ax.annotate(f"{int(r['threshold'])}", (xi, yi), textcoords="offset points", xytext=(4, -10),
                            fontsize=8)
    ax.set(xlabel="mean depth (loops per token)",
           ylabel=("answer" if answers else "token") + " accuracy (%)",
           title=_title("Accuracy against compute, per exit rule", title))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def figures(result: Mapping[str, Any], *, title: str = "") -> dict[str, Figure]:
    """Every figure of an evaluation (`metrics.summarize`'s dict): `accuracy_vs_depth`, `exit_histogram`
    (the gate's p(t) and Q-exit at the lowest, middle and highest q of the grid), `per_loop`."""
    trained = result["trained_loops"]
    q_rules = [r for r in result["rules"] if r["kind"] == "q_exit"]
    picked = [q_rules[i] for i in sorted({0, len(q_rules) // 2, len(q_rules) - 1})] if q_rules else []
    return {
        "accuracy_vs_depth": accuracy_vs_depth_figure(result, title=title),
        "exit_histogram": exit_histogram_figure(
            result["exit_pdf_per_loop"], {r["label"]: r["exit_histogram"] for r in picked},
            trained_loops=trained, title=title),
        "per_loop": per_loop_figure(result, trained_loops=trained, title=title),
    }


def save(figs: Mapping[str, Figure], directory: str | os.PathLike) -> list[str]:
    """Write each figure as DIRECTORY/<name>.png (150 dpi); returns the paths."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for name, fig in figs.items():
        path = os.path.join(directory, f"{name}.png")
        fig.savefig(path, dpi=150)
        paths.append(path)
    return paths
