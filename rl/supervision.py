"""Waiting on actors with a deadline: a dead or hung actor becomes `ActorLost`, never a hang.

Every result the driver waits for comes through `supervised_get`. It waits in short polls;
while a call is pending it probes its actor with `ping`, which each actor serves on a thread
of its own (the "control" concurrency group, rl/actors.py), so a long rollout or update still
answers at once. A probe that stays unanswered for `timeout_s` means the process is stopped
or wedged (SIGSTOP, a deadlocked engine): the actor is killed and reported lost, like one
that died. A long call is never cut short while its actor answers probes.

Who recovers is the caller's business: RolloutGroup replaces a rollout worker and re-issues
its share of the call; the trainer rebuilds the learners from the newest checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import ray
from ray.exceptions import GetTimeoutError, RayActorError

POLL_S = 1.0
"""Seconds between looks at pending calls; the lost-actor detection latency for a hang is
timeout_s + this."""


START_TIMEOUT_S = 1800.0
"""Deadline for an actor to come up (engine or model load): no probe can reach an actor before
its constructor returns, so its start is bounded by time alone."""


def get_started(refs: list, what: str) -> list:
    """ray.get of the calls that wait for actors to start; a start past START_TIMEOUT_S is an
    error that says what did not come up, never a hang."""
    try:
        return ray.get(refs, timeout=START_TIMEOUT_S)
    except GetTimeoutError:
        from rl.errors import TrainingError

        raise TrainingError(f"{what} did not start within {START_TIMEOUT_S:g} s (loading the model or building "
                            f"the engine hung); see the actor's log above.") from None


class ActorLost(RuntimeError):
    """An actor died or stopped answering while the driver waited on it."""

    def __init__(self, role: str, index: int, cause: str):
        super().__init__(f"{role} actor {index} lost: {cause}")
        self.role, self.index, self.cause = role, index, cause


@dataclass
class Watched:
    """One pending call: its result ref and the actor that owes it."""

    role: str
    """rollout | learner."""
    index: int
    """The actor's rank in its group."""
    actor: object
    ref: object
    method: str = ""
    """The call's name, for the report."""


def supervised_get(calls: list[Watched], timeout_s: float, fetch: bool = True) -> list:
    """ray.get of every call's ref, in order; ActorLost for the first actor that dies (the
    call raised RayActorError) or leaves a liveness probe unanswered for `timeout_s`. Errors
    raised by the called method itself propagate unchanged.

    fetch=False waits until the results exist without copying them here (a weight buffer
    bound for the engines) and returns None each; the actors are then probed once more,
    since a result that failed looks ready too.
    """
    pending = {c.ref: c for c in calls}
    probes: dict = {}  # call ref -> (ping ref, sent at)
    while pending:
        done, _ = ray.wait([c.ref for c in pending.values()], num_returns=len(pending), timeout=POLL_S,
                           fetch_local=fetch)
        for ref in done:
            call = pending.pop(ref)
            probes.pop(ref, None)
            if fetch:
                _get_or_lost(call, ref)
            else:
                _get_or_lost(call, call.actor.ping.remote(), wait=True, timeout_s=timeout_s)
        now = time.monotonic()
        for key, call in pending.items():
            probe = probes.get(key)
            if probe is None:
                probes[key] = (call.actor.ping.remote(), now)
                continue
            ping, sent = probe
            answered, _ = ray.wait([ping], timeout=0)
            if answered:
                _get_or_lost(call, ping)
                probes[key] = (call.actor.ping.remote(), now)
            elif now - sent > timeout_s:
                ray.kill(call.actor, no_restart=True)  # a stopped process still dies of SIGKILL
                raise ActorLost(call.role, call.index, f"no answer to a liveness probe for {timeout_s:g} s "
                                f"(trainer.actor_timeout_s){_during(call)}: hung or stopped; killed")
    return [ray.get(c.ref) for c in calls] if fetch else [None] * len(calls)


def _get_or_lost(call: Watched, ref, wait: bool = False, timeout_s: float = 0.0) -> object:
    try:
        return ray.get(ref, timeout=timeout_s if wait else 0)
    except RayActorError as e:
        raise ActorLost(call.role, call.index, f"died{_during(call)} ({_first_line(e)})") from e
    except GetTimeoutError:  # only a probe waits: no answer within the deadline
        ray.kill(call.actor, no_restart=True)
        raise ActorLost(call.role, call.index, f"no answer to a liveness probe for {timeout_s:g} s "
                        f"(trainer.actor_timeout_s){_during(call)}: hung or stopped; killed") from None


def _during(call: Watched) -> str:
    return f" during {call.method}" if call.method else ""


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    for line in text.splitlines():
        line = line.strip()
        if line and "ActorDiedError" not in line:
            return line[:200]
    return type(e).__name__
