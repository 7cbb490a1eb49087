"""The length-oblivious policies, and `make_policy`: this module imports every built-in policy
(`length_aware` lives in length_aware.py), so all four are registered once it is imported.

All of them are stateless functions of (pending, running): the executor may call `plan` every
engine step or only after something finished, and the schedule is the same.
"""

from __future__ import annotations

from typing import Sequence

from .base import POLICIES, SchedulingPolicy, register_policy
from .length_aware import LengthAwarePolicy
from .types import Seq, SeqId

__all__ = [
    "SchedulingPolicy",
    "FullGroupPolicy",
    "NaiveMicroPolicy",
    "ContinuousPolicy",
    "LengthAwarePolicy",
    "make_policy",
    "policy_names",
]


@register_policy
class FullGroupPolicy(SchedulingPolicy):
    """Everything at once (vLLM `n=G` for all B prompts); ignores slots and KV budget."""

    name = "full_group"

    def plan(self, pending, running, kv_budget_tokens, slots) -> list[SeqId]:
        return [s.seq_id for s in pending]


@register_policy
class NaiveMicroPolicy(SchedulingPolicy):
    """Rounds: micro-groups of `micro_group_size` samples of one prompt, packed in order into
    `slots`; the next round starts only when every sequence of the current round has finished.

    With micro_group_size None a micro-group is `slots` samples of one prompt; a micro-group
    larger than the slots is cut to the slots. Stateless: a round is in progress iff something
    is running.
    """

    name = "naive_micro"

    def __init__(self, micro_group_size: int | None = None) -> None:
        if micro_group_size is not None and micro_group_size < 1:
            raise ValueError(f"micro_group_size must be >= 1, got {micro_group_size}")
        self.micro_group_size = micro_group_size

    def plan(self, pending, running, kv_budget_tokens, slots) -> list[SeqId]:
        if running or not pending:
            return []
        if slots < 1:
            raise ValueError("naive_micro needs slots >= 1")
        g = self.micro_group_size or slots
        out: list[SeqId] = []
        i = 0
        while i < len(pending):
            # the micro-group starting at i: up to g consecutive pending samples of one prompt
            j = i
            while j < len(pending) and j - i < g and pending[j].group_id == pending[i].group_id:
                j += 1
            if out and len(out) + (j - i) > slots:
                break
            out.extend(s.seq_id for s in pending[i:j][: slots - len(out)])
            if len(out) >= slots:
                break
            i = j
        return out


@register_policy
class ContinuousPolicy(SchedulingPolicy):
    """`slots` slots; a freed slot immediately takes the next pending sequence (FIFO, across
    groups). Memory is bounded by the slots, not by a KV budget."""

    name = "continuous"

    def plan(self, pending: Sequence[Seq], running: Sequence[Seq], kv_budget_tokens, slots):
        free = max(0, slots - len(running))
        return [s.seq_id for s in pending[:free]]


def policy_names() -> list[str]:
    return sorted(POLICIES)


def make_policy(name: str, **kw) -> SchedulingPolicy:
    """Build a policy by name: `full_group`, `naive_micro`, `continuous`, `length_aware`."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; valid names: {', '.join(policy_names())}")
    return POLICIES[name](**kw)
