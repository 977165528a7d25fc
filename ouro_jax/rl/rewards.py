"""Reward functions: a rollout's generated tokens (or their text) and its reference -> a float.

  exact_match    synthetic tasks (`ouro_jax.data.tasks`): 1 when the first len(answer) generated tokens
                 are the answer, else 0 (`task_prompts` splits a task's examples into prompt and answer);
  math           text: the content of the LAST \\boxed{...} of the response (nested braces allowed) is
                 checked against the reference answer with math-verify (equivalent forms: 0.5, 1/2,
                 \\frac{1}{2} are equal); no \\boxed{} scores 0;
  "module:function"  any importable function with the same signature (`get`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

import numpy as np


def task_prompts(batch: dict[str, np.ndarray]) -> tuple[list[list[int]], list[list[int]]]:
    """A synthetic task's examples (`Task.batch`, left-padded [R, n]) -> (prompts, answers): each row's
    real tokens up to and including the one that predicts the first answer token, and the answer tokens
    (the targets where `answer_mask` is 1; tasks put them at the end of the row)."""
    prompts, answers = [], []
    for ids, targets, answer, segment in zip(batch["input_ids"], batch["targets"], batch["answer_mask"],
                                             batch["segment_ids"], strict=True):
        where = np.flatnonzero(answer)
        start = int(np.flatnonzero(segment)[0])
        prompts.append(ids[start:where[0] + 1].tolist())
        answers.append(targets[where].tolist())
    return prompts, answers


def exact_match(generated: Sequence[int], answer: Sequence[int]) -> float:
    """1.0 when the first len(answer) generated tokens are `answer`, else 0.0."""
    return float(list(generated[:len(answer)]) == list(answer))


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} in `text` (balanced braces), or None when there is none or
    it is not closed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth < 0:
            return text[begin:i]
    return None


def math_reward(response: str, reference: str) -> float:
    """1.0 when the last \\boxed{} answer of `response` equals `reference` (math-verify), else 0.0."""
    from math_verify import parse, verify

    answer = last_boxed(response)
    if answer is None or not answer.strip():
        return 0.0
    gold, predicted = parse(f"${reference}$"), parse(f"${answer}$")
    return float(bool(gold) and bool(predicted) and verify(gold, predicted))


BUILTIN = {"exact_match": exact_match, "math": math_reward}


def get(name: str) -> Callable:
    """A reward by name: "exact_match", "math", or "package.module:function"."""
    if name in BUILTIN:
        return BUILTIN[name]
    module, sep, attr = name.partition(":")
    if not sep:
        raise ValueError(f"reward {name!r} must be one of {sorted(BUILTIN)} or 'module:function'")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"reward {name!r} cannot be imported: {err}") from err
    if not callable(fn):
        raise ValueError(f"reward {name!r} is not callable")
    return fn
