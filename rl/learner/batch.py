"""What the driver sends a learner rank each step."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainBatch:
    """One rank's share of a step's sequences (lists of equal length N)."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    advantages: list[list[float]]
    """Per response token, [len(response_ids[i])] each."""
    rollout_logprobs: list[list[float]]
    """The engine's log-prob of each sampled token, [len(response_ids[i])] each."""
    num_tokens: float
    """Valid response tokens of the GLOBAL batch (all ranks)."""
    num_seqs: float
    """Sequences with >= 1 response token in the GLOBAL batch."""
    max_len: float
    """Dr. GRPO's constant C."""
