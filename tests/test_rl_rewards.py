"""Reward functions of ouro_jax.rl.rewards on their edge cases."""

import numpy as np
import pytest

from ouro_jax.data.tasks import Addition, PHop
from ouro_jax.rl import rewards


def test_task_prompts_addition_and_exact_match():
    task = Addition(n=40, terms=3, digits=2, seed=0)
    prompts, answers = rewards.task_prompts(task.batch([0, 1]))
    for index, prompt, answer in zip([0, 1], prompts, answers, strict=True):
        example = task.example(np.random.default_rng([0, 0, index]))["input_ids"]
        assert prompt[-1] == task.equals and prompt == example[:len(prompt)]
        assert prompt + answer == example  # the answer is the rest of the example
        total = sum(int("".join(map(str, prompt[i:i + 2]))) for i in range(0, len(prompt) - 1, 3))
        assert int("".join(map(str, answer))) == total
        assert rewards.exact_match([*answer, 5, 5], answer) == 1.0
        assert rewards.exact_match([*answer[:-1], (answer[-1] + 1) % 10], answer) == 0.0
        assert rewards.exact_match(answer[:-1], answer) == 0.0  # too short


def test_task_prompts_phop_answer_is_the_last_target():
    task = PHop(n=16, p=2, alphabet=4)
    batch = task.batch([3])
    prompts, answers = rewards.task_prompts(batch)
    assert prompts[0] == batch["input_ids"][0].tolist() and answers[0] == [int(batch["targets"][0, -1])]


@pytest.mark.parametrize("response,reference,expected", [
    ("so the answer is \\boxed{12}.", "12", 1.0),
    ("no box here, 12", "12", 0.0),  # no \boxed{}
    ("\\boxed{3} then I corrected it: \\boxed{12}", "12", 1.0),  # several: the last one counts
    ("\\boxed{12} then \\boxed{3}", "12", 0.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),  # equivalent forms
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac{2}{4}}", "1/2", 1.0),
    ("\\boxed{x^{2}+2x}", "2x + x^2", 1.0),
    ("\\boxed{\\sqrt{2}}", "2^{1/2}", 1.0),
    ("\\boxed{13}", "12", 0.0),
    ("\\boxed{}", "12", 0.0),  # empty
    ("\\boxed{12", "12", 0.0),  # not closed
])
def test_math_reward(response, reference, expected):
    assert rewards.math_reward(response, reference) == expected


def test_last_boxed_nested_braces():
    assert rewards.last_boxed("a \\boxed{\\frac{a}{b}} b") == "\\frac{a}{b}"


def test_get_builtin_and_pluggable():
    assert rewards.get("math") is rewards.math_reward
    assert rewards.get("numpy:isclose") is np.isclose
    for bad in ("nope", "numpy:no_such_function", "no_such_module:f"):
        with pytest.raises(ValueError, match="reward"):
            rewards.get(bad)
