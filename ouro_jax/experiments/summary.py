"""Results of a study -> a section: tables (columns + rows of strings), checks against the paper's claims
and the JSON data behind them. Pure functions of the runs' `result.json` contents.

Spread over seeds is the sample standard deviation (`± sd`); "min" is the worst seed. Accuracies are
answer accuracy (exact match of the answer) on the held-out stream, in percent; losses are the held-out
CE (nats) over all loss positions, per loop.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from ouro_jax.experiments import plan

DEPTHS = (1.5, 2.0, 2.5, 3.0, 3.5)  # mean depths (loops) at which gates are compared


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _mean_sd(values, scale: float = 100.0, digits: int = 1) -> str:
    """"mean ± sd" of `values` * scale (just the value for one seed)."""
    values = scale * np.asarray(values, np.float64)
    if values.size == 1:
        return f"{values[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


def _group(results: list[dict], by) -> dict:
    groups = defaultdict(list)
    for r in sorted(results, key=lambda r: r["seed"]):
        groups[by(r)].append(r)
    return dict(groups)


def _model_order(name: str) -> tuple[int, int]:
    """Sort key: by compute (K L), then the looped model before the deeper ones (1x4, 2x2, 4x1)."""
    layers, loops = plan.parse_model(name)
    return layers * loops, -loops


def _per_loop_cells(runs: list[dict], key: str, loops: int, scale: float = 100.0,
                    digits: int = 1) -> list[str]:
    """Per loop 1..loops: mean ± sd of r[key][t] over the runs; "–" past a run's loops."""
    table = np.array([r[key] for r in runs])  # [seeds, T]
    return [_mean_sd(table[:, t], scale, digits) if t < table.shape[1] else "–" for t in range(loops)]


def _seed_table(runs: list[dict], key: str = "answer_accuracy") -> dict:
    return {str(r["seed"]): r[key] for r in runs}


def compare(results: list[dict]) -> dict:
    """Models x objectives: answer accuracy per loop, and the iso-parameter / iso-FLOP checks."""
    groups = _group(results, lambda r: (r["model"], r["objective"]))
    order = sorted(groups, key=lambda g: (_model_order(g[0]), plan.OBJECTIVES.index(g[1])))
    loops = max(len(r["answer_accuracy"]) for r in results)
    facts = results[0]["task"] == "facts"
    key, scale, digits = ("bits_per_param", 1.0, 3) if facts else ("answer_accuracy", 100.0, 1)
    what = "bits/param loop" if facts else "loop"
    columns = ["model", "objective", "params", "seeds", *(f"{what} {t}" for t in range(1, loops + 1)),
               "min (last loop)", "deeper is better", "train s / run (CPU s)"]
    rows, data = [], {}
    for model, objective in order:
        runs = groups[(model, objective)]
        one_loop = plan.parse_model(model)[1] == 1
        rows.append([model, "(any: one loop)" if one_loop else objective, f"{runs[0]['params']:,}",
                     str(len(runs)), *_per_loop_cells(runs, key, loops, scale, digits),
                     f"{scale * min(r[key][-1] for r in runs):.{digits}f}",
                     f"{sum(r['deeper_is_better'] for r in runs)}/{len(runs)}",
                     _times(runs)])
        data[f"{model}/{objective}"] = {
            "params": runs[0]["params"], "answer_accuracy": _seed_table(runs),
            "loss": _seed_table(runs, "loss"), "deeper_is_better": _seed_table(runs, "deeper_is_better"),
            **({"bits_per_param": _seed_table(runs, "bits_per_param")} if facts else {}),
            "mean": np.mean([r[key] for r in runs], axis=0).tolist(),
            "sd": (np.std([r[key] for r in runs], axis=0, ddof=1).tolist() if len(runs) > 1 else None)}
    loss_columns = ["model", "objective", *(f"loss loop {t}" for t in range(1, loops + 1)),
                    "answer tokens right (last loop)"]
    loss_rows = [[model, objective, *_per_loop_cells(groups[(model, objective)], "loss", loops, 1.0, 3),
                  _mean_sd([r["answer_token_accuracy"][-1] for r in groups[(model, objective)]])]
                 for model, objective in order]
    return {"tables": [{"columns": columns, "rows": rows}, {"columns": loss_columns, "rows": loss_rows}],
            "checks": _compare_checks(groups, facts), "data": data}


def _times(runs: list[dict]) -> str:
    """Mean training wall seconds per run, and CPU seconds where recorded."""
    wall = f"{np.mean([r['train_wall_s'] for r in runs]):.0f}"
    cpu = [r["train_cpu_s"] for r in runs if "train_cpu_s" in r]
    return wall + (f" ({np.mean(cpu):.0f})" if cpu else "")


def _compare_checks(groups: dict, facts: bool) -> list[str]:
    """The issue's goals, per seed: KxL >= KLx1 - 1 point and >= Kx1 + 30 points; Ouro's intermediate
    loops vs last-loop-only; for the facts task, bits/param of KxL vs Kx1 (no capacity from looping)."""
    checks = []
    by_seed = {g: {r["seed"]: r for r in runs} for g, runs in groups.items()}
    for (model, objective), runs in sorted(by_seed.items()):
        layers, loops = plan.parse_model(model)
        if loops == 1:
            continue
        param = by_seed.get((f"{layers}x1", "ouro"), {})
        flop = by_seed.get((f"{layers * loops}x1", "ouro"), {})
        for seed, r in sorted(runs.items()):
            if facts:
                if seed in param:
                    mine, theirs = r["bits_per_param"][-1], param[seed]["bits_per_param"][-1]
                    checks.append(f"{model} {objective} seed {seed}: {mine:.3f} bits/param vs {layers}x1 "
                                  f"{theirs:.3f} ({mine / max(theirs, 1e-9):.2f}x)")
                continue
            acc = r["answer_accuracy"][-1]
            parts = []
            if seed in flop:
                other = flop[seed]["answer_accuracy"][-1]
                parts.append(f"vs iso-FLOP {layers * loops}x1 {_pct(other)}: "
                             f"{'PASS' if acc >= other - 0.01 else 'FAIL'} (>= -1 point)")
            if seed in param:
                other = param[seed]["answer_accuracy"][-1]
                parts.append(f"vs iso-param {layers}x1 {_pct(other)}: "
                             f"{'PASS' if acc >= other + 0.30 else 'FAIL'} (>= +30 points)")
            if parts:
                checks.append(f"{model} {objective} seed {seed}: {_pct(acc)}; " + "; ".join(parts))
        if objective == "ouro" and (model, "last_loop") in by_seed and not facts:
            mine = np.mean([r["answer_accuracy"] for r in runs.values()], axis=0)
            other = np.mean([r["answer_accuracy"] for r in by_seed[(model, "last_loop")].values()], axis=0)
            diffs = ", ".join(f"loop {t + 1}: {100 * (mine[t] - other[t]):+.1f}" for t in range(loops - 1))
            checks.append(f"{model} intermediate loops, Ouro minus last-loop-only (points, mean over seeds): "
                          + diffs)
    return checks


def beta(results: list[dict]) -> dict:
    """Entropy weight ablation: the exit distribution per loop and accuracy per beta."""
    groups = _group(results, lambda r: (r["model"], r["setting"]))
    loops = max(len(r["answer_accuracy"]) for r in results)
    columns = ["model", "setting", "seeds", *(f"p(exit) % loop {t}" for t in range(1, loops + 1)),
               "mean exit loop", "entropy", "acc last loop", "deeper is better"]
    rows, data = [], {}
    for (model, setting), runs in sorted(groups.items(), key=lambda kv: (_model_order(kv[0][0]), kv[0][1])):
        rows.append([model, setting, str(len(runs)), *_per_loop_cells(runs, "exit_pdf", loops),
                     f"{np.mean([r['mean_exit_loop'] for r in runs]):.2f}",
                     f"{np.mean([r['entropy'] for r in runs]):.3f}",
                     _mean_sd([r["answer_accuracy"][-1] for r in runs]),
                     f"{sum(r['deeper_is_better'] for r in runs)}/{len(runs)}"])
        data[f"{model}/{setting}"] = {"exit_pdf": _seed_table(runs, "exit_pdf"),
                                      "answer_accuracy": _seed_table(runs),
                                      "mean_exit_loop": _seed_table(runs, "mean_exit_loop"),
                                      "entropy": _seed_table(runs, "entropy")}
    acc_columns = ["model", "setting", *(f"loop {t}" for t in range(1, loops + 1))]
    acc_rows = [[model, setting, *_per_loop_cells(runs, "answer_accuracy", loops)]
                for (model, setting), runs in sorted(groups.items(),
                                                     key=lambda kv: (_model_order(kv[0][0]), kv[0][1]))]
    return {"tables": [{"columns": columns, "rows": rows}, {"columns": acc_columns, "rows": acc_rows}],
            "checks": [], "data": data}


def accuracy_at_depth(curve: list[dict], depth: float) -> float | None:
    """Q-exit accuracy at a mean depth, linear between the curve's points; None outside its range."""
    points = sorted((p["mean_depth"], p["accuracy"]) for p in curve)
    depths = np.array([d for d, _ in points])
    if not depths[0] - 1e-9 <= depth <= depths[-1] + 1e-9:
        return None
    return float(np.interp(depth, depths, [a for _, a in points]))


def _gate_name(r: dict) -> str:
    return {"ouro": "Stage I gate", "static": "static exit (all rows at loop t)"}.get(
        r["objective"], f"Stage II gate ({r['setting']})")


def gate(results: list[dict]) -> dict:
    """Stage II vs Stage I exit gate: Q-exit answer accuracy at equal mean depth (paper Fig. 5), with the
    static exit of the Stage I model (every row stops at loop t: accuracy at depth t) as the floor."""
    static = [{**r, "objective": "static", "q_exit": [{"q": None, "mean_depth": t + 1.0, "accuracy": a}
                                                       for t, a in enumerate(r["answer_accuracy"])]}
              for r in results if r["objective"] == "ouro"]
    results = results + static
    groups = _group(results, lambda r: (r["model"], _gate_name(r)))
    columns = ["model", "gate", "seeds", *(f"acc @ depth {d:g}" for d in DEPTHS), "acc @ q=0.5 (depth)"]
    rows, data = [], {}
    for (model, name), runs in sorted(groups.items(), key=lambda kv: (_model_order(kv[0][0]), kv[0][1])):
        cells = []
        for depth in DEPTHS:
            values = [accuracy_at_depth(r["q_exit"], depth) for r in runs]
            cells.append("–" if any(v is None for v in values) else _mean_sd(values))
        half = [p for r in runs for p in r["q_exit"] if p["q"] == 0.5]
        cells.append(f"{_pct(np.mean([p['accuracy'] for p in half]))} "
                     f"({np.mean([p['mean_depth'] for p in half]):.2f})" if half else "–")
        rows.append([model, name, str(len(runs)), *cells])
        data[f"{model}/{name}"] = {"q_exit": _seed_table(runs, "q_exit"),
                                   "answer_accuracy": _seed_table(runs)}
    tables = [{"columns": columns, "rows": rows}]
    stage1 = [r for r in results if r["objective"] == "ouro" and "accuracy_by_difficulty" in r]
    if stage1:
        loops = len(stage1[0]["answer_accuracy"])
        levels = sorted(stage1[0]["accuracy_by_difficulty"], key=int)
        tables.append({"columns": ["model", "hops", *(f"loop {t}" for t in range(1, loops + 1))],
                       "rows": [[model, h, *_per_loop_cells(
                           [{"a": r["accuracy_by_difficulty"][h]} for r in runs], "a", loops)]
                                for model, runs in _group(stage1, lambda r: r["model"]).items()
                                for h in levels]})
    checks = []
    for model in sorted({m for m, _ in groups}, key=_model_order):
        base = groups.get((model, "Stage I gate"), [])
        for (m, name), runs in sorted(groups.items()):
            if m != model or name == "Stage I gate" or not base:
                continue
            diffs = []
            for depth in DEPTHS:
                pairs = [(accuracy_at_depth(r["q_exit"], depth), accuracy_at_depth(b["q_exit"], depth))
                         for r, b in zip(runs, base, strict=False)]
                if all(a is not None and b is not None for a, b in pairs):
                    diffs.append(f"{depth:g}: {100 * np.mean([a - b for a, b in pairs]):+.1f}")
            checks.append(f"{model} {name} minus Stage I gate at equal mean depth (points): "
                          + (", ".join(diffs) or "no common depth range"))
    return {"tables": tables, "checks": checks, "data": data}


STUDIES = {"compare": compare, "beta": beta, "gate": gate}
