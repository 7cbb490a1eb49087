"""Built-in rewards, in the plain convention `f(completion, <columns>, **options)`.

Each has a short name for YAML (`path: math_verify`), listed in rewards/registry.py; options go
in the entry's `kwargs`. They are ordinary functions: call them directly in a notebook to check one.
"""

from __future__ import annotations

import re
import threading
from typing import Any, Sequence

_BOXED = "\\boxed"


def _after_hashes(text: str) -> str | None:
    """GSM8K style: the text after the last '####', or None."""
    if "####" not in text:
        return None
    return text.rsplit("####", 1)[1].strip()


def _parse(text: str, timeout: int | None) -> list:
    from math_verify import parse  # lazy: it imports sympy (slow); only workers need it

    parsed = parse(text, parsing_timeout=timeout)
    if not parsed and "$" not in text and _BOXED not in text:
        # A bare LaTeX gold like "x^2+2x" or "\frac{1}{2}" parses once put in math mode.
        parsed = parse(f"${text}$", parsing_timeout=timeout)
    return parsed


def math_verify_reward(completion: str, answer: Any = None, ground_truth: Any = None) -> float:
    """1.0 if the completion's final answer equals the reference mathematically, else 0.0.

    The reference comes from the `answer` column (or `ground_truth`). The completion's answer is
    taken, in order, from the last `\\boxed{...}`, the text after the last `####` (GSM8K), or
    else math-verify's extraction (which falls back to the last number). Equivalent forms count:
    `\\boxed{1/2}`, `0.5` and `\\frac{1}{2}` all match the reference "0.5". A GSM8K reference
    like "...#### 72" is reduced to "72" first.

    Example:
        >>> math_verify_reward("so the answer is \\\\boxed{\\\\frac{1}{2}}", answer="0.5")
        1.0
        >>> math_verify_reward("#### 73", answer="72")
        0.0
    """
    from math_verify import verify

    gold_text = answer if answer is not None else ground_truth
    if gold_text is None:
        raise ValueError("math_verify needs an `answer` (or `ground_truth`) column with the reference answer")
    gold_text = str(gold_text)
    gold_text = _after_hashes(gold_text) or gold_text
    # math-verify's own timeouts use signal.alarm, which works only in a main thread (the
    # executor's workers); elsewhere the executor's timeout is the only guard.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold = _parse(gold_text, timeout)
    if not gold:
        raise ValueError(f"math_verify could not parse the reference answer {gold_text!r}")
    if _BOXED not in completion:
        tail = _after_hashes(completion)
        if tail is not None:
            completion = tail
    pred = _parse(completion, timeout) if completion.strip() else []
    if not pred:
        return 0.0
    return 1.0 if verify(gold, pred, timeout_seconds=timeout) else 0.0


def exact_match_reward(completion: str, answer: Any, strip: bool = True, ignore_case: bool = False) -> float:
    """1.0 if the completion equals the `answer` column, else 0.0.

    Options: `strip` (default True) trims surrounding whitespace from both; `ignore_case`.

    Example:
        >>> exact_match_reward(" Paris\\n", answer="Paris")
        1.0
        >>> exact_match_reward("paris", answer="Paris", ignore_case=True)
        1.0
    """
    a, b = str(completion), str(answer)
    if strip:
        a, b = a.strip(), b.strip()
    if ignore_case:
        a, b = a.casefold(), b.casefold()
    return 1.0 if a == b else 0.0


# DeepSeek-R1 style: reasoning in <think>, then the answer in <answer>.
DEFAULT_FORMAT = r"^<think>.*?</think>\s*<answer>.*?</answer>\s*$"


def format_reward(completion: str, pattern: str = DEFAULT_FORMAT, full_match: bool = True) -> float:
    """1.0 if the completion matches a regex (DOTALL: `.` spans lines), else 0.0.

    Options: `pattern` (default: `<think>...</think><answer>...</answer>`), `full_match`
    (default True; False: the pattern may match anywhere).

    Example:
        >>> format_reward("<think>2+2</think> <answer>4</answer>")
        1.0
        >>> format_reward("The answer is 4", pattern=r"answer is \\d+", full_match=False)
        1.0
    """
    rx = re.compile(pattern, re.DOTALL)
    match = rx.fullmatch(completion) if full_match else rx.search(completion)
    return 1.0 if match else 0.0


def _length(completion: str, completion_ids: Sequence[int] | None, completion_length: int | None) -> int:
    # Tokens when the driver passes them (a `completion_ids` or `completion_length` column),
    # else characters: the reward must not need a tokenizer.
    if completion_length is not None:
        return int(completion_length)
    if completion_ids is not None:
        return len(completion_ids)
    return len(completion)


def length_penalty(completion: str, completion_ids: Sequence[int] | None = None,
                   completion_length: int | None = None, budget: int = 1024, penalty: float = 1.0) -> float:
    """0 within `budget`, then falls linearly to -`penalty` at twice the budget (and stays there).

    Length L is in tokens when a `completion_ids` or `completion_length` column is present,
    else in characters. reward = -penalty * min(1, max(0, L - budget) / budget).

    Example:
        >>> length_penalty("x" * 1536, budget=1024)
        -0.5
        >>> length_penalty("short", budget=1024)
        0.0
    """
    if budget <= 0:
        raise ValueError(f"length_penalty: budget must be > 0, got {budget}")
    n = _length(completion, completion_ids, completion_length)
    if n <= budget:
        return 0.0
    return -penalty * min(1.0, (n - budget) / budget)


def dapo_overlong_reward(completion: str, completion_ids: Sequence[int] | None = None,
                         completion_length: int | None = None, max_length: int = 20480,
                         cache_length: int = 4096) -> float:
    """DAPO soft overlong punishment (arXiv:2503.14476, eq. 13), with E = max_length - cache_length:

        0             if L <= E
        (E - L) / cache_length   if E < L <= max_length
        -1            if L > max_length

    L is in tokens when a `completion_ids` or `completion_length` column is present, else in
    characters. Add it next to a correctness reward (weights 1 and 1, as in DAPO).

    Example (max_length 20480, cache_length 4096, so E = 16384):
        >>> dapo_overlong_reward("", completion_length=16000)
        0.0
        >>> dapo_overlong_reward("", completion_length=18432)
        -0.5
        >>> dapo_overlong_reward("", completion_length=20480)
        -1.0
    """
    if not 0 < cache_length <= max_length:
        raise ValueError(f"dapo_overlong: need 0 < cache_length <= max_length, got {cache_length}, {max_length}")
    n = _length(completion, completion_ids, completion_length)
    expected = max_length - cache_length
    if n <= expected:
        return 0.0
    if n <= max_length:
        return (expected - n) / cache_length
    return -1.0
