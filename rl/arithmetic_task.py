"""The quickstart task: small arithmetic word-free questions, generated deterministically.

No download: `data.path: builtin:arithmetic` builds the dataset in memory from a seed. The
questions are easy enough that SmolLM2-135M-Instruct answers some of them correctly before
training (so GRPO has signal) and hard enough that it gets many wrong.
"""

from __future__ import annotations

import random

PROMPT_TEMPLATE = "What is {a} {op} {b}? Reply with only the final number."


def arithmetic_examples(num_examples: int = 4096, seed: int = 0, max_operand: int = 20) -> list[dict]:
    """Rows {"prompt": str, "answer": str} for a + b and a - b with operands in [0, max_operand].

    Subtraction keeps a >= b so answers are non-negative.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(num_examples):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        op = rng.choice("+-")
        if op == "-" and a < b:
            a, b = b, a
        answer = a + b if op == "+" else a - b
        rows.append({"prompt": PROMPT_TEMPLATE.format(a=a, op=op, b=b), "answer": str(answer)})
    return rows
