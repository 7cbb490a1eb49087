"""The admission-policy interface and the decorator that registers a policy by name.

How a rollout executor drives a policy (the simulator does exactly the same):

    policy = make_policy("length_aware", predictor="token_conditioned")   # once, kept across steps
    for each training step:
        seqs = [Seq(...) for each of the B x G samples]
        policy.begin_rollout(seqs)
        pending, running = list(seqs), []
        while pending or running:
            for sid in policy.plan(pending, running, kv_budget_tokens, slots):
                move that Seq from pending to running; engine.add_request(...)
            engine.step()                       # one decode step: every running seq +1 token
            for each running seq: seq.generated += 1
            for each finished seq: remove from running; policy.on_finished(seq, seq.generated)

`plan` may be called every engine step or only after something finished (and at the start);
every policy here gives the same schedule either way. It must return ids of `pending` only, each
at most once, and never an empty plan while nothing is running and something is pending.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, ClassVar, Sequence

from .types import Seq, SeqId


class SchedulingPolicy(ABC):
    """Decides which pending sequences the engine admits now."""

    name: ClassVar[str] = ""

    def begin_rollout(self, seqs: Sequence[Seq]) -> None:
        """A new rollout (training step) with these sequences starts; all are pending."""

    @abstractmethod
    def plan(
        self, pending: Sequence[Seq], running: Sequence[Seq], kv_budget_tokens: int, slots: int
    ) -> list[SeqId]:
        """Ids of pending sequences to admit now.

        pending: not yet admitted, in arrival order (group by group);
        running: admitted and unfinished, `generated` up to date;
        kv_budget_tokens: C, KV-cache tokens available to this rollout;
        slots: S, maximal number of concurrently running sequences.
        """

    def on_finished(self, seq: Seq, length: int) -> None:
        """`seq` finished with `length` output tokens (its KV is free again)."""


# name -> policy class, filled by `register_policy`. Looked up by `make_policy` (policies.py, the
# one module that imports every built-in policy); this module imports no policy.
POLICIES: dict[str, Callable[..., SchedulingPolicy]] = {}


def register_policy(cls):
    """Class decorator: registers `cls` under `cls.name`; a duplicate name is an error."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in POLICIES:
        raise ValueError(f"policy {cls.name!r} registered twice")
    POLICIES[cls.name] = cls
    return cls
