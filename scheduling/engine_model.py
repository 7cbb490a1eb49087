"""A model of vLLM's KV cache and preemption, for the simulator.

What the model keeps of vLLM V1's scheduler (vllm/v1/core/sched/scheduler.py):
  * KV lives in blocks of `block_tokens`; a sequence about to produce its next token needs
    ceil((prompt + generated + 1) / B) blocks. With `share_prompts` (prefix caching) the
    prompt's full blocks are held once per prompt while any sibling is scheduled.
  * Running requests are served in the order they were scheduled. When the blocks run out,
    the most recently scheduled request is preempted (FCFS policy): its blocks are freed, it
    goes back to the front of the waiting queue, and when it is scheduled again its prompt
    and generated tokens are computed again (counted in `recomputed_tokens`).
  * Waiting requests (admitted by the policy, or preempted) are scheduled in queue order while
    their blocks fit, and not at all in a step that preempted.
  * With `victim` predicted_longest or predicted_shortest (vLLM's
    `scheduling_policy="priority"`), each request carries the priority it was added with
    (`preemption_priority`, what the rollout executor gives vLLM): the victim is the running
    request of the largest (priority, arrival), and the waiting queue is served smallest
    (priority, arrival) first.
Every scheduled request produces one token per step, as in the decode-step model.
"""

from __future__ import annotations

import heapq
import math
from collections import deque

from .types import Seq

PREEMPTIONS = ("lifo", "predicted_longest", "predicted_shortest")
"""What vLLM preempts when its cache overflows (rollout.scheduler.preemption): lifo, its own
FCFS choice; the others, its priority scheduling with `preemption_priority`."""


def preemption_priority(preemption: str, predicted_length: float | None) -> int:
    """The vLLM priority of a request (smaller: served first, preempted last): 0 with lifo; the
    predicted output length with predicted_longest, its negation with predicted_shortest."""
    if preemption == "lifo":
        return 0
    if predicted_length is None:
        raise ValueError(f"preemption {preemption!r} needs a policy with a length predictor")
    return round(predicted_length) * (1 if preemption == "predicted_longest" else -1)


class EngineKVModel:
    """Which admitted sequences the engine decodes this step, within `capacity_tokens`."""

    def __init__(self, capacity_tokens: int, block_tokens: int = 1, share_prompts: bool = False,
                 max_running: int | None = None, victim: str = "lifo") -> None:
        if victim not in PREEMPTIONS:
            raise ValueError(f"victim must be one of {PREEMPTIONS}, got {victim!r}")
        self.block_tokens = max(int(block_tokens), 1)
        self.capacity_blocks = capacity_tokens // self.block_tokens
        self.share_prompts = share_prompts
        self.max_running = max_running
        self.victim = victim
        self.running: list[Seq] = []  # in scheduling order
        self.waiting: deque[Seq] = deque()  # lifo: FCFS queue
        # predicted_*: (priority, arrival, seq); arrivals are unique, so seqs are never compared
        self._heap: list[tuple[int, int, Seq]] = []
        self._key: dict[int, tuple[int, int]] = {}  # id(seq) -> (priority, arrival)
        self._arrivals = 0
        self.preemptions = 0
        self.recomputed_tokens = 0

    def add(self, seq: Seq, priority: int = 0) -> None:
        """The policy admitted `seq`: it joins the waiting queue (at the back with lifo; else by
        `priority`, smallest first: `preemption_priority`)."""
        self._key[id(seq)] = (priority, self._arrivals)
        self._arrivals += 1
        self._push_waiting(seq, front=False)

    def _push_waiting(self, seq: Seq, front: bool) -> None:
        if self.victim != "lifo":
            heapq.heappush(self._heap, (*self._key[id(seq)], seq))
        elif front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def _peek_waiting(self) -> Seq | None:
        if self.victim != "lifo":
            return self._heap[0][2] if self._heap else None
        return self.waiting[0] if self.waiting else None

    def _pop_waiting(self) -> Seq:
        if self.victim != "lifo":
            return heapq.heappop(self._heap)[2]
        return self.waiting.popleft()

    def _pick_victim(self) -> Seq:
        if self.victim != "lifo":
            victim = max(self.running, key=lambda s: self._key[id(s)])
            self.running.remove(victim)
            return victim
        return self.running.pop()

    def remove(self, seq: Seq) -> None:
        """`seq` finished."""
        self.running.remove(seq)
        self._key.pop(id(seq), None)

    def _blocks(self, seqs: list[Seq], next_token: int = 1) -> int:
        """Blocks `seqs` need for their next token (`next_token` 0: blocks they hold now)."""
        b = self.block_tokens
        total = 0
        groups = set()
        for s in seqs:
            shared = s.prompt_tokens // b if self.share_prompts else 0
            total += math.ceil((s.kv_tokens + next_token) / b) - shared
            if shared and s.group_id not in groups:
                groups.add(s.group_id)
                total += shared
        return total

    def schedule(self) -> list[Seq]:
        """The sequences that produce a token this step (the engine's running list after it)."""
        preempted = False
        while self.running and self._blocks(self.running) > self.capacity_blocks:
            victim = self._pick_victim()
            self.preemptions += 1
            self.recomputed_tokens += victim.kv_tokens
            self._push_waiting(victim, front=True)
            preempted = True
        if not preempted:
            while (head := self._peek_waiting()) is not None and (
                    self.max_running is None or len(self.running) < self.max_running):
                if self._blocks(self.running + [head]) > self.capacity_blocks:
                    if not self.running:
                        raise RuntimeError(f"sequence {head.seq_id!r} needs more KV than the engine's "
                                           f"{self.capacity_blocks} blocks of {self.block_tokens}")
                    break
                self.running.append(self._pop_waiting())
        return list(self.running)

    @property
    def kv_tokens(self) -> int:
        """Tokens in blocks held now (blocks x block size)."""
        return self._blocks(self.running, next_token=0) * self.block_tokens if self.running else 0


def engine_kv_lower_bound_steps(items, capacity_tokens: int, block_tokens: int,
                                share_prompts: bool) -> int:
    """The KV-time area bound of `kv_lower_bound_steps`, counted in the engine's blocks:
    ceil(blocks held over every step / blocks of the cache). items: (group_id, prompt_tokens,
    length) per sequence. A sequence of prompt p and length L holds ceil((p + t) / B) blocks at
    its t-th step; with `share_prompts` the prompt's full blocks are held once per prompt, for
    as long as its longest sample. No engine of `capacity_tokens` decodes the items in fewer
    steps, however they are scheduled and preempted (a preemption only adds work)."""
    b = max(int(block_tokens), 1)
    area = 0
    longest: dict = {}
    for g, p, n in items:
        shared = p // b if share_prompts else 0
        # sum over t = 1..n of ceil((p + t) / b), in closed form per block boundary crossing
        area += _ceil_div_sum(p, n, b) - shared * n
        if shared:
            longest[g] = max(longest.get(g, (0, 0))[0], n), shared
    area += sum(n * shared for n, shared in longest.values())
    blocks = capacity_tokens // b
    return math.ceil(area / max(blocks, 1)) if items else 0


def _ceil_div_sum(p: int, n: int, b: int) -> int:
    """sum_{t=1..n} ceil((p + t) / b)."""
    def prefix(m: int) -> int:  # sum_{x=1..m} ceil(x / b)
        q, r = divmod(m, b)
        return b * q * (q + 1) // 2 + r * (q + 1)
    return prefix(p + n) - prefix(p)
