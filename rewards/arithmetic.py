"""The quickstart's reward: is the last number in the completion the right answer?"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def arithmetic_reward(prompt: str, completion: str, answer: str | None, **_: object) -> float:
    """1.0 when the last number in `completion` equals `answer`, plus 0.2 when it is also the
    only content (a bare number), else 0.0. A row without an answer (None: the open-ended half
    of `builtin:mixed`) scores 0.0.

    The brevity bonus rewards the format the prompt asks for, which gives GRPO a gradient
    even on questions the model cannot yet solve.

    Example:
        >>> arithmetic_reward("What is 2 + 3?", "2 + 3 = 5", "5")
        1.0
        >>> arithmetic_reward("What is 2 + 3?", "5", "5")
        1.2
        >>> arithmetic_reward("What is 2 + 3?", "It is 6.", "5")
        0.0
    """
    if answer is None:
        return 0.0
    numbers = _NUMBER.findall(completion)
    if not numbers or float(numbers[-1]) != float(answer):
        return 0.0
    bare = completion.strip().rstrip(".") == numbers[-1]
    return 1.2 if bare else 1.0
