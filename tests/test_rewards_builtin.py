"""Built-in rewards, called directly (they are plain functions), plus their docstring examples."""

from __future__ import annotations

import doctest

import pytest

import rewards.builtin as builtin
from rewards import RewardExecutor, RewardFunctionConfig, load_reward_functions
from rewards.builtin import (dapo_overlong_reward, exact_match_reward, format_reward, length_penalty,
                             math_verify_reward)


def test_docstring_examples():
    result = doctest.testmod(builtin)
    assert result.attempted >= 10 and result.failed == 0


@pytest.mark.parametrize("completion,answer", [
    ("The answer is \\boxed{1/2}", "0.5"),
    ("so \\boxed{0.5}", "\\frac{1}{2}"),
    ("\\boxed{\\frac{1}{2}}", "$\\frac{1}{2}$"),
    ("\\boxed{\\frac12}", "1/2"),
    ("48 + 24 = 72 clips\n#### 72", "72"),
    ("She sold 72 clips.", "Natalia sold 48/2 = 24 clips in May.\n#### 72"),  # GSM8K gold
    ("The answer is 72.", "72"),
    ("\\boxed{x(x+2)}", "x^2+2x"),
    ("\\boxed{0.1}", "10%"),
])
def test_math_verify_equivalent_forms_are_correct(completion, answer):
    assert math_verify_reward(completion, answer=answer) == 1.0


@pytest.mark.parametrize("completion,answer", [
    ("\\boxed{2}", "3"),
    ("\\boxed{1/3}", "0.5"),
    ("I think 72 but the answer is 69", "72"),  # the last number counts
    ("#### 71", "72"),
    ("no answer here", "2"),
    ("", "2"),
])
def test_math_verify_wrong_answers(completion, answer):
    assert math_verify_reward(completion, answer=answer) == 0.0


def test_math_verify_uses_ground_truth_column_and_needs_a_reference():
    assert math_verify_reward("\\boxed{4}", ground_truth="4") == 1.0
    with pytest.raises(ValueError, match="needs an `answer`"):
        math_verify_reward("\\boxed{4}")


def test_exact_match_and_format():
    assert exact_match_reward("Paris ", answer="Paris") == 1.0
    assert exact_match_reward("Paris ", answer="Paris", strip=False) == 0.0
    assert exact_match_reward("paris", answer="Paris") == 0.0
    assert format_reward("<think>\nwork\n</think>\n<answer>4</answer>") == 1.0
    assert format_reward("<answer>4</answer>") == 0.0
    assert format_reward("x <answer>4</answer>", pattern=r"<answer>\d+</answer>", full_match=False) == 1.0


def test_length_penalty():
    assert length_penalty("x" * 100, budget=100) == 0.0
    assert length_penalty("x" * 150, budget=100, penalty=2.0) == -1.0
    assert length_penalty("x" * 500, budget=100) == -1.0
    assert length_penalty("short", completion_ids=list(range(150)), budget=100) == -0.5  # tokens win


@pytest.mark.parametrize("length,expected", [(16000, 0.0), (16384, 0.0), (18432, -0.5), (20480, -1.0),
                                             (20481, -1.0), (30000, -1.0)])
def test_dapo_overlong_in_tokens(length, expected):
    # Lmax 20480, Lcache 4096 -> E = 16384; 18432 -> (16384 - 18432) / 4096 = -0.5
    assert dapo_overlong_reward("", completion_ids=[0] * length) == pytest.approx(expected)
    assert dapo_overlong_reward("", completion_length=length) == pytest.approx(expected)


def test_dapo_overlong_in_characters():
    assert dapo_overlong_reward("x" * 18, max_length=20, cache_length=4) == -0.5


def test_builtins_through_the_executor():
    fns = load_reward_functions([
        RewardFunctionConfig(path="math_verify"),
        RewardFunctionConfig(path="dapo_overlong", kwargs={"max_length": 24, "cache_length": 8}),
    ])
    completions = ["\\boxed{\\frac{1}{2}}", "\\boxed{0.25}"]
    completions = [c.ljust(20) for c in completions]  # 20 characters: E = 16, (16 - 20) / 8 = -0.5
    with RewardExecutor(fns, timeout_s=10.0, num_workers=1) as ex:
        r = ex.score(["p", "p"], completions, {"answer": ["0.5", "0.5"]}, [0, 0])
    assert r.scores["math_verify"] == [1.0, 0.0]
    assert r.scores["dapo_overlong"] == [-0.5, -0.5]
    assert r.rewards == [0.5, -0.5]
