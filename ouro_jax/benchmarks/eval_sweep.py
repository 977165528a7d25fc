"""eval.sweep: the cost of lm-eval scores at every loop count from one pass (`ouro_jax.evaluate.tasks`),
against the goal "a sweep of loops 1..L on a loglikelihood task costs at most 1.3 x one evaluation at L
loops" (issue 23), next to the alternative of L separate lm-eval runs.

A random Ouro of the given shape with the Ouro tokenizer's vocabulary is exported with the tokenizer; a
multiple-choice task over `docs` synthetic documents (questions and four choices of random words) is
written as an offline YAML (`tasks.write_local_tasks`). Timed end to end, each from a fresh model object
(loading, compiling and scoring, as a user runs it), in one process, side by side:
  one    the native lm-eval model at L loops, one `simple_evaluate`;
  sweep  `LoopSweepLM` over loops 1..L: one forward per batch of L loops, then lm-eval's metric per loop;
  sweep+q  the same with four Q-exit thresholds (0.3, 0.5, 0.7, 0.9) as well;
  separate  L native runs, run k with `exit_at_loop=k` (and `num_loops=k` past the trained T).
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np

from ouro_jax.benchmarks.common import Result, table

GOAL = 1.3
THRESHOLDS = (0.3, 0.5, 0.7, 0.9)
WORDS = ("loop", "state", "gate", "token", "layer", "exit", "depth", "model", "weight", "shared", "river",
         "stone", "light", "number", "answer", "question", "early", "late", "small", "large")


def _documents(path: str, docs: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    words = lambda n: " ".join(rng.choice(WORDS, n))
    with open(path, "w") as f:
        for _ in range(docs):
            f.write(json.dumps({"question": words(int(rng.integers(8, 24))),
                                "choices": [" " + words(int(rng.integers(1, 6))) for _ in range(4)],
                                "answer": int(rng.integers(4)), "text": words(32)}) + "\n")


def sweep(*, docs: int, max_loops: int, trained_loops: int, hidden_size: int, layers: int, batch_size: int,
          repeats: int) -> Result:
    """Result with the seconds of each way (median of `repeats`) and the ratios to one evaluation."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import lm_eval
    from flax import nnx
    from lm_eval.tasks import TaskManager

    from ouro_jax.convert.pretrained import save_pretrained
    from ouro_jax.evaluate import tasks
    from ouro_jax.evaluate.lm_eval import OuroLM
    from ouro_jax.model.config import tiny
    from ouro_jax.model.ouro import Ouro

    heads = max(hidden_size // 64, 1)
    config = tiny(vocab_size=49152, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                  head_dim=hidden_size // heads, max_position_embeddings=256, total_ut_steps=trained_loops)
    loops = list(range(1, max_loops + 1))
    with tempfile.TemporaryDirectory() as work:
        path = str(save_pretrained(Ouro(config, rngs=nnx.Rngs(0)), os.path.join(work, "hf"), dtype="float32",
                                   tokenizer="ouro"))
        _documents(os.path.join(work, "docs.jsonl"), docs)
        tasks.write_local_tasks(work, os.path.join(work, "docs.jsonl"))
        manager = TaskManager(include_path=work)
        name = "loop_smoke_mc"
        task = tasks.load_tasks(manager, [name])

        def native(**depth):
            lm = OuroLM(pretrained=path, batch_size=batch_size, **depth)
            return lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=manager, bootstrap_iters=0,
                                           log_samples=False, verbosity="ERROR")["results"][name]

        def swept(thresholds):
            lm = tasks.LoopSweepLM(path, loops, thresholds, batch_size=batch_size)
            return tasks.sweep(lm, task, manager)[name]

        ways = {
            "one": lambda: native(num_loops=max_loops),
            "sweep": lambda: swept(()),
            "sweep+q": lambda: swept(THRESHOLDS),
            "separate": lambda: [native(num_loops=max(k, trained_loops), exit_at_loop=k) for k in loops],
        }
        seconds = {way: [] for way in ways}
        for _ in range(repeats):  # interleaved, so a busy machine slows every way alike
            for way, fn in ways.items():
                start = time.perf_counter()
                fn()
                seconds[way].append(time.perf_counter() - start)
    median = {way: float(np.median(s)) for way, s in seconds.items()}
    ratio = {way: median[way] / median["one"] for way in ways}
    rows = [(way, f"{median[way]:.2f}", f"{ratio[way]:.2f}") for way in ways]
    verdict = "met" if ratio["sweep"] <= GOAL else "missed"
    text = (f"{docs} documents x 4 choices, loops 1..{max_loops} (trained T={trained_loops}), hidden "
            f"{hidden_size}, {layers} layer(s), vocab 49152, batch {batch_size}; median of {repeats}, "
            "each from a fresh model (load + compile + score)\n\n"
            + table(["way", "seconds", f"x one evaluation at {max_loops} loops"], rows)
            + f"\n\nsweep / one = {ratio['sweep']:.2f} (goal <= {GOAL}: {verdict}); "
            f"{max_loops} separate runs / sweep = {median['separate'] / median['sweep']:.2f}")
    return Result(text, {"seconds": median, "ratio_to_one": ratio, "goal": GOAL, "docs": docs,
                         "max_loops": max_loops, "trained_loops": trained_loops, "hidden_size": hidden_size,
                         "layers": layers, "batch_size": batch_size, "repeats": repeats})
