"""Decode-step simulator: runs any policy on known lengths, exactly as an executor would drive it.

One decode step = every running sequence generates one token; a sequence of length L is running
for L steps and frees its KV at the end of its last step. The policy sees only what an executor
would give it (pending, running with `generated`), never the true lengths (unless its predictor
is the oracle).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

from .base import SchedulingPolicy
from .engine_model import EngineKVModel, engine_kv_lower_bound_steps, preemption_priority
from .traces import Trace
from .types import GroupId


@dataclass
class SimResult:
    """Measures of one simulated rollout."""

    policy: str
    decode_steps: int
    lower_bound: int
    """max(max_j L_j, ceil(sum_j L_j / S)): no S-slot schedule needs fewer steps."""
    peak_kv_tokens: int
    """max over steps of sum(prompt + generated) of the running sequences."""
    peak_concurrency: int
    mean_concurrency: float
    """generated tokens / decode steps."""
    total_tokens: int
    overhead_s: float
    """wall time spent inside the policy's plan/on_finished calls."""
    plan_calls: int
    kv_over_budget_steps: int
    """steps whose actual KV exceeded the budget (what vLLM would answer with preemptions);
    0 with `engine`, where the engine never exceeds it."""
    kv_lower_bound: int = 0
    """`kv_lower_bound_steps` of the trace: the bound with the KV-time area term."""
    preemptions: int = 0
    """with `engine`: sequences the modelled vLLM preempted."""
    recomputed_tokens: int = 0
    """with `engine`: prompt + generated tokens of the preempted sequences (computed again)."""
    engine_kv_lower_bound: int = 0
    """with `engine`: the area bound in the engine's blocks (`engine_kv_lower_bound_steps`)."""
    predictor_mae: float | None = None
    """|predicted - true| output length, the prediction taken at admission (what the plan
    used), mean over the sequences; None for a policy without a length predictor."""

    @property
    def steps_over_bound(self) -> float:
        return self.decode_steps / max(self.lower_bound, 1)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["steps_over_bound"] = self.steps_over_bound
        return d


def lower_bound_steps(lengths: Iterable[int], slots: int) -> int:
    """max(max_j L_j, ceil(sum_j L_j / S))."""
    lengths = list(lengths)
    if not lengths:
        return 0
    return max(max(lengths), math.ceil(sum(lengths) / slots))


def kv_lower_bound_steps(lengths: Sequence[int], prompts: Sequence[int], slots: int,
                         kv_budget_tokens: int) -> int:
    """max(max_j L_j, ceil(sum_j L_j / S), ceil(sum_j L_j (p_j + L_j / 2) / C)).

    The third term is the KV-time area: sequence j holds p_j + t tokens at its t-th step, about
    L_j (p_j + L_j / 2) token-steps over its life, and a cache of C tokens gives at most C per
    step. lengths L_j and prompts p_j [n] (same order), S slots, C KV tokens."""
    lengths = list(lengths)
    if not lengths:
        return 0
    area = sum(n * (p + n / 2) for n, p in zip(lengths, prompts))
    return max(lower_bound_steps(lengths, slots), math.ceil(area / max(kv_budget_tokens, 1)))


def simulate(
    policy: SchedulingPolicy,
    trace: Trace | Iterable[tuple[GroupId, int, int]],
    slots: int,
    kv_budget_tokens: int,
    plan_every_step: bool = False,
    max_steps: int | None = None,
    engine: EngineKVModel | None = None,
) -> SimResult:
    """Run `policy` on `trace` (a Trace or (group_id, prompt_tokens, length) triples).

    `plan_every_step` False asks the policy only at the start and after a step in which something
    finished (what an event-driven executor does); True asks every step. Raises if the policy
    admits an unknown or already admitted id, or stalls (nothing running, nothing admitted).

    engine: a fresh `EngineKVModel` (vLLM's blocks, prefix sharing and preemption) sized to the
    engine's cache; admitted sequences then run only when the model schedules them, as in a
    capped vLLM engine. None: every admitted sequence runs every step (the KV is unbounded and
    `kv_over_budget_steps` counts the steps over the budget). The policy is told the engine's
    KV layout (`set_kv_layout`) when it has one.
    """
    trace = Trace.coerce(trace)
    true_len = trace.lengths
    seqs = trace.to_seqs()
    by_id = {s.seq_id: s for s in seqs}
    if engine is not None and hasattr(policy, "set_kv_layout"):
        policy.set_kv_layout(engine.block_tokens, engine.share_prompts)
    policy.begin_rollout(seqs)
    pending = list(seqs)
    running: list = []
    steps = peak_kv = peak_conc = tokens = over = calls = 0
    overhead = 0.0
    predictor = getattr(policy, "predictor", None)
    errors: list[float] = []
    ask = True
    limit = max_steps if max_steps is not None else 10 * (sum(true_len) + 1)
    while pending or running:
        if ask or plan_every_step:
            t0 = time.perf_counter()
            ids = policy.plan(pending, running, kv_budget_tokens, slots)
            overhead += time.perf_counter() - t0
            calls += 1
            if ids:
                admit = set(ids)
                if len(admit) != len(ids):
                    raise RuntimeError(f"{policy.name}: duplicate ids in plan {ids}")
                pend_ids = {s.seq_id for s in pending}
                bad = admit - pend_ids
                if bad:
                    raise RuntimeError(f"{policy.name}: admitted ids not pending: {sorted(bad)[:5]}")
                running.extend(by_id[i] for i in ids)
                predicted = {i: float(predictor.predict(by_id[i])) for i in ids} if predictor is not None else {}
                errors += [abs(predicted[i] - true_len[i]) for i in predicted]
                if engine is not None:
                    for i in ids:  # the priority vLLM would get, from the length predicted now
                        engine.add(by_id[i], priority=preemption_priority(engine.victim, predicted.get(i)))
                pending = [s for s in pending if s.seq_id not in admit]
        if not running:
            raise RuntimeError(f"{policy.name}: stalled with {len(pending)} pending and none running")
        # one decode step
        steps += 1
        if steps > limit:
            raise RuntimeError(f"{policy.name}: exceeded {limit} steps")
        decoding = engine.schedule() if engine is not None else running
        for s in decoding:
            s.generated += 1
        tokens += len(decoding)
        kv = engine.kv_tokens if engine is not None else sum(s.kv_tokens for s in running)
        peak_kv = max(peak_kv, kv)
        peak_conc = max(peak_conc, len(decoding))
        over += kv > kv_budget_tokens
        done = [s for s in decoding if s.generated >= true_len[s.seq_id]]
        ask = bool(done)
        if done:
            if engine is not None:
                for s in done:
                    engine.remove(s)
            running = [s for s in running if s.generated < true_len[s.seq_id]]
            t0 = time.perf_counter()
            for s in done:
                policy.on_finished(s, s.generated)
            overhead += time.perf_counter() - t0
    return SimResult(
        policy=policy.name,
        decode_steps=steps,
        lower_bound=lower_bound_steps(true_len, slots),
        peak_kv_tokens=peak_kv,
        peak_concurrency=peak_conc,
        mean_concurrency=tokens / max(steps, 1),
        total_tokens=tokens,
        overhead_s=overhead,
        plan_calls=calls,
        kv_over_budget_steps=over,
        kv_lower_bound=kv_lower_bound_steps(true_len, [p for _, p, _ in trace.items], slots,
                                            kv_budget_tokens),
        preemptions=engine.preemptions if engine is not None else 0,
        recomputed_tokens=engine.recomputed_tokens if engine is not None else 0,
        predictor_mae=sum(errors) / len(errors) if errors else None,
        engine_kv_lower_bound=engine_kv_lower_bound_steps(
            trace.items, engine.capacity_blocks * engine.block_tokens, engine.block_tokens,
            engine.share_prompts) if engine is not None else 0,
    )
