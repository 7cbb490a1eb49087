"""The quickstart task: small arithmetic word-free questions, generated deterministically.

No download: `data.path: builtin:arithmetic` builds the dataset in memory from a seed. The
questions are easy enough that SmolLM2-135M-Instruct answers some of them correctly before
training (so GRPO has signal) and hard enough that it gets many wrong.
"""

from __future__ import annotations

import random

PROMPT_TEMPLATE = "What is {a} {op} {b}? Reply with only the final number."


def is_held_out(a: int, op: str, b: int) -> bool:
    """About one question in ten, fixed by its operands: the `test` split, never trained on."""
    return (a * 37 + b * 11 + (op == "+") * 5) % 10 == 0


def arithmetic_examples(num_examples: int = 4096, seed: int = 0, max_operand: int = 20,
                        split: str = "train") -> list[dict]:
    """Rows {"prompt": str, "answer": str} for a + b and a - b with operands in [0, max_operand].

    Subtraction keeps a >= b so answers are non-negative. split "train": `num_examples` questions
    drawn with `seed`, none of them held out; split "test": every held-out question once, in a
    fixed order (the evaluation set).
    """
    def row(a, op, b):
        answer = a + b if op == "+" else a - b
        return {"prompt": PROMPT_TEMPLATE.format(a=a, op=op, b=b), "answer": str(answer)}

    if split == "test":
        return [row(a, op, b) for op in "+-" for a in range(max_operand + 1) for b in range(max_operand + 1)
                if (op == "+" or a >= b) and is_held_out(a, op, b)]
    if split != "train":
        raise ValueError(f"builtin:arithmetic has the splits train and test, not {split!r}")
    rng = random.Random(seed)
    rows = []
    while len(rows) < num_examples:
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        op = rng.choice("+-")
        if op == "-" and a < b:
            a, b = b, a
        if not is_held_out(a, op, b):
            rows.append(row(a, op, b))
    return rows


MIXED_PROMPTS_FILE = "configs/traces/mixed_prompts.yaml"


def mixed_examples(seed: int = 0) -> list[dict]:
    """`builtin:mixed`: the open-ended instructions of configs/traces/mixed_prompts.yaml
    alternating with arithmetic questions (the rollout benchmark's `mixed` set). Open-ended rows
    have no reference answer (answer None: the arithmetic reward scores them 0); they exist for
    their long, varied response lengths, the workload Infinite Sampling schedules."""
    from pathlib import Path

    import yaml

    path = Path(__file__).resolve().parents[1] / MIXED_PROMPTS_FILE
    open_ended = yaml.safe_load(path.read_text())["open_ended"]
    arith = arithmetic_examples(num_examples=len(open_ended), seed=seed)
    rows = []
    for text, a in zip(open_ended, arith):
        rows += [{"prompt": text, "answer": None}, a]
    return rows
