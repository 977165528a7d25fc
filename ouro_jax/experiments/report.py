"""Write a study's section: `DIR/results.json` (every section so far, keyed "task/study"), `DIR/results.md`
(every section's tables, checks, command and wall time) and `DIR/<task>_<study>.png`."""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

RESULTS_JSON, RESULTS_MD = "results.json", "results.md"
TITLES = {"compare": "looped vs iso-parameter vs iso-FLOP, Ouro vs last-loop-only objective",
          "beta": "entropy weight beta: does the exit distribution collapse?",
          "gate": "Stage II vs Stage I exit gate at equal mean depth"}


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def section_markdown(name: str, section: dict) -> str:
    task, study = name.split("/")
    finished = section["runs_trained"] + section["runs_cached"]
    cpu_runs = section.get("cpu_runs", 0)
    parts = [f"## {task}: {TITLES[study]}", "", f"Command: `{section['command']}`  ",
             f"Wall time: {section['wall_s']:.0f} s summed over its runs (training + measuring; training "
             f"CPU {section.get('cpu_s', 0):.0f} s"
             + ("" if cpu_runs == finished else f" over {cpu_runs} of {finished} runs")
             + f"); this invocation {section.get('invocation_s', section['wall_s']):.0f} s "
             f"({section['runs_trained']} trained, {section['runs_cached']} cached"
             + (f", {section['runs_missing']} not yet run" if section.get("runs_missing") else "") + ").  ",
             f"Plot: `{section['png']}`", ""]
    for table in section["tables"]:
        parts += [markdown_table(table["columns"], table["rows"]), ""]
    if section["checks"]:
        parts += [f"- {line}" for line in section["checks"]] + [""]
    return "\n".join(parts)


def _plot(ax, name: str, section: dict) -> None:
    study = name.split("/")[1]
    if study == "gate":
        for i, (label, entry) in enumerate(section["data"].items()):
            curves = list(entry["q_exit"].values())
            depth = np.mean([[p["mean_depth"] for p in c] for c in curves], axis=0)
            acc = np.mean([[p["accuracy"] for p in c] for c in curves], axis=0)
            order = np.argsort(depth)
            static = "static" in label
            ax.plot(depth[order], 100 * acc[order], marker="s" if static else "o",
                    linestyle="--" if static else "-", color="gray" if static else f"C{i}", label=label)
        ax.set_xlabel("mean exit depth (loops), Q-exit over q")
        ax.set_ylabel("answer accuracy (%)")
        ax.set_ylim(0, 102)
        return
    key = "exit_pdf" if study == "beta" else ("bits_per_param" if "bits_per_param" in next(
        iter(section["data"].values())) else "answer_accuracy")
    scale = 1.0 if key == "bits_per_param" else 100.0
    max_loops = max(len(next(iter(e[key].values()))) for e in section["data"].values())
    for i, (label, entry) in enumerate(section["data"].items()):
        color = f"C{i}"
        table = scale * np.array(list(entry[key].values()))  # [seeds, T]
        spread = table.std(0, ddof=1) if len(table) > 1 else None
        if table.shape[1] == 1 and max_loops > 1:  # a one-loop model: a reference line across the loops
            ax.axhline(table.mean(), linestyle="--", color=color, label=f"{label.split('/')[0]} (one loop)")
            if spread is not None:
                ax.axhspan(table.mean() - spread[0], table.mean() + spread[0], color=color, alpha=0.15)
            continue
        ax.errorbar(np.arange(1, table.shape[1] + 1), table.mean(0), yerr=spread, marker="o", capsize=3,
                    color=color, label=label)
    ax.set_xlabel("loop (LM head read after loop t)")
    ax.set_ylabel({"exit_pdf": "mean exit probability", "bits_per_param": "bits per parameter",
                   "answer_accuracy": "answer accuracy (%)"}[key])
    ax.set_xticks(range(1, max_loops + 1))
    if key == "answer_accuracy":
        ax.set_ylim(0, 102)


def plot(path: str, name: str, section: dict) -> None:
    """Per-loop accuracy (compare), exit probability (beta) or accuracy vs mean depth (gate) per model."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    _plot(ax, name, section)
    ax.set_title(f"{name.split('/')[0]}: {TITLES[name.split('/')[1]]}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(output_dir: str, name: str, section: dict) -> dict:
    """Add (or replace) section `name` ("task/study") and rewrite results.json, results.md and its PNG."""
    path = os.path.join(output_dir, RESULTS_JSON)
    sections = {}
    if os.path.exists(path):
        with open(path) as f:
            sections = json.load(f)
    section = {**section, "png": f"{name.replace('/', '_')}.png"}
    sections[name] = section
    plot(os.path.join(output_dir, section["png"]), name, section)
    with open(path + ".tmp", "w") as f:
        json.dump(sections, f, indent=1)
    os.replace(path + ".tmp", path)
    text = "# Synthetic reasoning suite results\n\n" + "\n".join(
        section_markdown(n, s) for n, s in sorted(sections.items()))
    with open(os.path.join(output_dir, RESULTS_MD), "w") as f:
        f.write(text)
    return sections
