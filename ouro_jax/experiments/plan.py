"""What to train: one `Run` per (task, model KxL, objective, seed, ablation setting), its training config
and its directory name.

`KxL` = K distinct decoder layers looped L times (model.num_hidden_layers = K, model.total_ut_steps = L),
Saunshi et al.'s k⊗L. Every run starts from the p-hop demo recipe (`ouro_jax.train.recipes.demo`:
hidden 64, 4 heads, AdamW lr 2e-3 with cosine decay, batch 128) and changes only the task, the shape and
the objective, so iso-parameter (K x 1), looped (K x L) and iso-FLOP (KL x 1) models share everything else.

Objectives: "ouro" = Stage I (arXiv:2510.25741 §3.3, Eq. 4: exit-pdf-weighted CE of every loop minus
beta * entropy); "last_loop" = only the last loop's CE (a looped model trained like a plain deep one).
With one loop both are plain CE, so a K x 1 model is trained once and stands for both.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json

import ml_collections

from ouro_jax.data.tasks import TASKS
from ouro_jax.train import recipes

OBJECTIVES = ("ouro", "last_loop")
SUITE = (  # `--study=all`: the studies of docs/experiments.md as the flags of their own commands (i-GSM
    # without its 4x1 run, so that the suite fits 60 minutes on 2 cores: 56 min measured, --workers=2)
    {"task": "phop", "study": "compare", "models": "1x1,1x4,4x1", "seeds": "3"},
    {"task": "phop", "study": "beta", "models": "1x4", "seeds": "1", "betas": "0,0.05,0.1"},
    {"task": "phop", "study": "gate", "models": "1x4", "seeds": "1", "task_settings": "p=3,p_min=1"},
    {"task": "addition", "study": "compare", "models": "1x1,1x4,4x1", "seeds": "1", "objectives": "ouro",
     "task_settings": "terms=3,digits=2,column_tokens=True"},
    {"task": "facts", "study": "compare", "models": "1x1,1x4", "seeds": "1", "objectives": "ouro"},
    {"task": "igsm", "study": "compare", "models": "1x1,1x4", "seeds": "1", "objectives": "ouro"},
)
SEQ_LEN = {"phop": 32, "addition": 32, "igsm": 48, "facts": 32}  # each task's default row length


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run. `parent`: the run whose parameters this one starts from (Stage II)."""

    task: str
    model: str  # "KxL"
    objective: str  # "ouro", "last_loop" or "stage2"
    seed: int
    config: ml_collections.ConfigDict = dataclasses.field(compare=False, repr=False)
    setting: str = ""  # the ablation value that distinguishes it in its study, e.g. "beta=0.05"
    parent: Run | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def label(self) -> str:
        parts = [self.task, self.model, self.objective, *([self.setting] if self.setting else []),
                 f"s{self.seed}"]
        return "_".join(p.replace("=", "").replace(".", "p") for p in parts)

    @property
    def key(self) -> str:
        """Directory name: task, model, objective, seed and a hash of the whole config (and the parent's
        key). Changed settings never reuse a finished run; the same config in two studies (beta = 0.1 in
        the beta study and in compare) is one run."""
        text = self.config.to_json_best_effort(sort_keys=True) + (self.parent.key if self.parent else "")
        digest = hashlib.sha1(text.encode()).hexdigest()[:8]
        return f"{self.task}_{self.model}_{self.objective}_s{self.seed}-{digest}"


def parse_model(name: str) -> tuple[int, int]:
    """"KxL" -> (K layers, L loops)."""
    try:
        layers, loops = (int(v) for v in name.lower().split("x"))
    except ValueError:
        raise ValueError(f"model {name!r} is not KxL (K layers looped L times), e.g. 1x4") from None
    if layers < 1 or loops < 1:
        raise ValueError(f"model {name!r}: K and L must be >= 1")
    return layers, loops


def parse_value(text: str):
    """A flag value: a Python literal (int, float, bool, None, list) or else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, object]) -> None:
    """Set dotted keys (`optimizer.learning_rate`) that must already exist in `config`."""
    for dotted, value in overrides.items():
        *path, last = dotted.split(".")
        node = config
        for part in path:
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                raise ValueError(f"unknown config key {dotted!r}")
            node = node[part]
        if last not in node:
            raise ValueError(f"unknown config key {dotted!r}")
        try:
            node[last] = value
        except TypeError as err:
            raise ValueError(f"config key {dotted!r}: {err}") from None


def task_config(task: str, *, steps: int, seq_len: int = 0, settings: dict | None = None,
                overrides: dict | None = None) -> ml_collections.ConfigDict:
    """The demo recipe on `task` (vocabulary and positions sized to it) for `steps` optimiser steps.

    settings: keys of `data.<task>` (e.g. {"p": 4}); overrides: any dotted config key, applied last.
    Periodic evaluation uses 8 held-out batches (learning curves in metrics.jsonl); the measurement after
    training (`measure`) uses its own, larger held-out set.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    c = recipes.demo(steps=steps)
    c.data.source = task
    c.data.seq_len = seq_len or SEQ_LEN[task]
    c.data.eval_batches = 8
    apply_overrides(c, {f"data.{task}.{k}": v for k, v in (settings or {}).items()})
    example = TASKS[task](n=c.data.seq_len, **c.data[task].to_dict())  # validates the settings
    c.model.vocab_size = example.vocab_size
    c.model.max_position_embeddings = c.data.seq_len
    c.eval_every_steps = max(steps // 6, 1)
    apply_overrides(c, overrides or {})
    return c


def shaped(config: ml_collections.ConfigDict, model: str, objective: str, *,
           beta: float | None = None) -> ml_collections.ConfigDict:
    """A copy of `config` with the KxL shape and the Stage I objective ("ouro" or "last_loop")."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; expected one of {', '.join(OBJECTIVES)}")
    layers, loops = parse_model(model)
    c = ml_collections.ConfigDict(config.to_dict())
    c.model.num_hidden_layers, c.model.total_ut_steps = layers, loops
    c.objective.stage = 1
    c.objective.weighting = "exit_pdf" if objective == "ouro" else "last_loop"
    if beta is not None:
        c.objective.beta = beta
    return c


def gate_config(stage1: ml_collections.ConfigDict, *, pairing: str, steps: int) -> ml_collections.ConfigDict:
    """Stage II (§3.4) on top of a Stage I run: the demo's gate recipe (`recipes.gate_stage2`: k = 50,
    gamma = 0.005, constant lr 1e-3, no weight decay) with `pairing`, the same data and shape.
    `init_from` is set to the Stage I run's directory when the run executes."""
    c = ml_collections.ConfigDict(stage1.to_dict())
    gate = recipes.gate_stage2("demo")
    c.objective.update(stage=2, pairing=pairing, k=gate.objective.k, gamma=gate.objective.gamma)
    c.optimizer = ml_collections.ConfigDict(gate.optimizer.to_dict())
    c.total_steps = steps
    c.eval_every_steps = max(steps // 3, 1)
    c.checkpoint_every_steps = 0
    return c


def compare_runs(task_cfg, models: list[str], objectives: list[str], seeds: list[int],
                 task: str) -> list[Run]:
    """Every model x objective, seed by seed (a partial suite has whole seeds); a model with one loop
    once per seed (the objectives coincide)."""
    return [Run(task, model, objective, seed, _seeded(shaped(task_cfg, model, objective), seed))
            for seed in seeds for model in models
            for objective in (["ouro"] if parse_model(model)[1] == 1 else objectives)]


def beta_runs(task_cfg, models: list[str], betas: list[float], seeds: list[int], task: str) -> list[Run]:
    """Stage I with each entropy weight beta (paper App. A: does p(t|x) collapse without it?)."""
    return [Run(task, model, "ouro", seed, _seeded(shaped(task_cfg, model, "ouro", beta=beta), seed),
                setting=f"beta={beta:g}")
            for seed in seeds for model in models for beta in betas]


def gate_runs(task_cfg, models: list[str], pairings: list[str], seeds: list[int], task: str,
              gate_steps: int) -> list[Run]:
    """Per model and seed: the Stage I run, then one Stage II run per pairing starting from it."""
    runs = []
    for seed in seeds:
        for model in models:
            stage1 = Run(task, model, "ouro", seed, _seeded(shaped(task_cfg, model, "ouro"), seed))
            runs.append(stage1)
            runs += [Run(task, model, "stage2", seed, gate_config(stage1.config, pairing=p, steps=gate_steps),
                         setting=f"pairing={p}", parent=stage1) for p in pairings]
    return runs


def study_runs(study: str, task_cfg, task: str, models: list[str], seeds: list[int], *,
               objectives: list[str], betas: list[float], pairings: list[str], gate_steps: int) -> list[Run]:
    """The runs of one study ("compare", "beta" or "gate"; the latter two use the looped models only)."""
    looped = [m for m in models if parse_model(m)[1] > 1]
    if study != "compare" and not looped:
        raise ValueError(f"--study={study} needs a looped model (L > 1) in --models")
    if study == "compare":
        return compare_runs(task_cfg, models, objectives, seeds, task)
    if study == "beta":
        return beta_runs(task_cfg, looped, betas, seeds, task)
    return gate_runs(task_cfg, looped, pairings, seeds, task, gate_steps)


def _seeded(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
    config.seed = seed
    return config


def describe(run: Run) -> dict:
    """The JSON-able identity of a run (stored with its result)."""
    return {"key": run.key, "task": run.task, "model": run.model, "objective": run.objective,
            "setting": run.setting, "seed": run.seed, "steps": run.config.total_steps,
            "parent": run.parent.key if run.parent else None,
            "config": json.loads(run.config.to_json_best_effort())}
