"""The Infinite Sampling loop: a `scheduling` policy decides admission, vLLM's engine decodes.

`run_rollout` drives an in-process `LLMEngine` step by step (add_request / step), asking the
policy which pending samples to admit; vLLM's own FCFS queue then only ever holds what the
policy chose. `EngineProbe` reads what the engine itself reports (KV blocks in use, preemptions,
running and waiting requests) from the engine core's scheduler, which lives in this process when
VLLM_ENABLE_V1_MULTIPROCESSING=0. Both are plain code: the worker and the benchmark share them.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

from rollout.records import RolloutStats
from scheduling import SchedulingPolicy, Seq, kv_lower_bound_steps, lower_bound_steps
from scheduling.engine_model import PREEMPTIONS, engine_kv_lower_bound_steps, preemption_priority


class EngineProbe:
    """In-process view of vLLM's scheduler: KV cache usage, preemptions, queue lengths.

    Everything degrades to "unknown" (None, 0) when the engine core is not in this process or
    its internals moved: measurement must never break generation.
    """

    def __init__(self, engine: Any) -> None:
        core = getattr(getattr(engine, "engine_core", None), "engine_core", None)
        self.scheduler = getattr(core, "scheduler", None)
        pool = getattr(getattr(self.scheduler, "kv_cache_manager", None), "block_pool", None)
        self.block_pool = pool if hasattr(pool, "get_num_free_blocks") else None
        cache = engine.vllm_config.cache_config
        self.block_size = int(cache.block_size)
        self.prefix_caching = bool(getattr(cache, "enable_prefix_caching", False))
        blocks = self.block_pool.num_gpu_blocks if self.block_pool else (cache.num_gpu_blocks or 0)
        # block 0 is vLLM's null block: never handed to a request
        self.usable_blocks = max(int(blocks) - 1, 0)
        self.preemptions = 0
        self.recomputed_tokens = 0
        self._wrap_preempt()

    @property
    def cache_tokens(self) -> int:
        """KV tokens the engine can hold (usable blocks x block size)."""
        return self.usable_blocks * self.block_size

    @property
    def allocated_tokens(self) -> int:
        """KV tokens the engine allocated: every block, the null block included, x block size."""
        return (self.usable_blocks + 1) * self.block_size

    def _wrap_preempt(self) -> None:
        # vLLM keeps only a per-request count; a good plan has no preemption at all, and this
        # counter makes every one visible.
        original = getattr(self.scheduler, "_preempt_request", None)
        if original is None:
            return

        def counted(request, *args, **kwargs):
            self.preemptions += 1
            # what the engine must compute again when the request is resumed
            self.recomputed_tokens += int(getattr(request, "num_computed_tokens", 0) or 0)
            return original(request, *args, **kwargs)

        self.scheduler._preempt_request = counted

    def set_priority_scheduling(self, on: bool) -> None:
        """Switch vLLM's scheduler between FCFS (preempt the most recently scheduled request) and
        priority scheduling (preempt the largest (priority, arrival); the waiting queue served
        smallest first), between rollouts. The engine is built with one of the two
        (EngineArgs.scheduling_policy, what training uses); this lets a benchmark compare both
        in one engine. Only with empty queues: the waiting queue's type changes with it."""
        from vllm.v1.core.sched.request_queue import SchedulingPolicy, create_request_queue

        s = self.scheduler
        if s is None:
            raise RuntimeError("the engine's scheduler is not in this process: build the engine with "
                               "scheduling_policy='priority' instead")
        policy = SchedulingPolicy.PRIORITY if on else SchedulingPolicy.FCFS
        if s.policy == policy:
            return
        if len(s.running) or len(s.waiting):
            raise RuntimeError("the scheduling policy can only change between rollouts")
        s.policy = policy
        s.waiting = create_request_queue(policy)
        if hasattr(s, "kv_holding_waiting"):
            s.kv_holding_waiting = create_request_queue(policy)

    def kv_tokens(self) -> int | None:
        """KV tokens in blocks referenced by requests now (shared prefix blocks count once;
        cached blocks that no request holds are free). None when unknown."""
        if self.block_pool is None:
            return None
        used = self.usable_blocks - self.block_pool.get_num_free_blocks()
        return max(used, 0) * self.block_size

    def queue_lengths(self) -> tuple[int, int]:
        """(running, waiting) requests inside vLLM's scheduler; (0, 0) when unknown."""
        s = self.scheduler
        if s is None:
            return 0, 0
        return len(getattr(s, "running", ())), len(getattr(s, "waiting", ()))


def run_rollout(
    engine: Any,
    policy: SchedulingPolicy,
    seqs: Sequence[Seq],
    prompt_ids: dict[str, list[int]],
    params: Any,
    kv_budget_tokens: int,
    slots: int,
    probe: EngineProbe | None = None,
    record_timeline: bool = False,
    should_stop: Callable[[], bool] | None = None,
    preemption: str = "lifo",
) -> tuple[dict[str, Any], RolloutStats]:
    """Generate every `seqs` (seq_id = vLLM request id) and return ({seq_id: CompletionOutput},
    stats). The policy is asked at the start and after every step in which a sequence finished:
    the only moments when KV or slots free up (every policy in `scheduling` gives the same
    schedule as when asked every step, and the plan then costs nothing on most steps).

    stats.extra: engine_peak_kv_tokens (blocks in use x block size), engine_peak_running,
    engine_peak_waiting, engine_kv_tokens (allocated: `EngineProbe.allocated_tokens`),
    recomputed_tokens (tokens the engine computed again after preempting; None without a probe),
    engine_kv_lower_bound (the area bound in the engine's own blocks, prompt blocks shared when
    prefix caching is on: `scheduling.engine_model.engine_kv_lower_bound_steps`),
    lower_bound (decode steps, from the lengths produced and `slots`),
    kv_lower_bound (also from the prompts and `kv_budget_tokens`: `kv_lower_bound_steps`),
    predictor_mae (|predicted - produced| output length, mean over the finished sequences, the
    prediction taken when each was admitted; None for a policy without a length predictor),
    kv_budget_tokens, slots, policy; with record_timeline, timeline = [[step, own KV tokens,
    engine KV tokens, admitted sequences], ...] after every step.

    should_stop: checked after every engine step; once it returns True the sequences still
    running are aborted and the rollout returns early (partial rollouts: a weight update
    does not wait for the longest sequences). stats.extra["unfinished"] then maps every
    sequence that did not finish to its partial CompletionOutput (None if never admitted).

    preemption: what vLLM preempts when the cache overflows. lifo: its default (the most recently
    scheduled request); predicted_longest / predicted_shortest: each request is added with its
    predicted output length (negated for predicted_shortest) as vLLM priority, for an engine
    with priority scheduling, which preempts the largest priority first and serves its waiting
    queue smallest first. Needs a policy with a length predictor.
    """
    if preemption not in PREEMPTIONS:
        raise ValueError(f"preemption must be one of {PREEMPTIONS}, got {preemption!r}")
    stats = RolloutStats()
    start = time.perf_counter()
    preempt_before = probe.preemptions if probe else 0
    recomputed_before = probe.recomputed_tokens if probe else 0
    if probe is not None and hasattr(policy, "set_kv_layout"):
        policy.set_kv_layout(probe.block_size, probe.prefix_caching)
    by_id = {s.seq_id: s for s in seqs}
    t0 = time.perf_counter()
    policy.begin_rollout(list(seqs))
    stats.scheduler_seconds += time.perf_counter() - t0
    pending: list[Seq] = list(seqs)
    running: dict[str, Seq] = {}
    finished: dict[str, Any] = {}
    engine_peak_kv = engine_peak_run = engine_peak_wait = 0
    timeline: list[list[int]] = []
    ask = True
    latest: dict[str, Any] = {}  # the newest (cumulative) output of each running sequence
    predictor = getattr(policy, "predictor", None)
    predicted: dict[str, float] = {}  # output length predicted at admission (what the plan used)
    while pending or running:
        if should_stop is not None and running and should_stop():
            engine.abort_request(list(running))
            while engine.has_unfinished_requests():  # let the engine drop the aborted requests
                engine.step()
            stats.extra["unfinished"] = {**{sid: latest.get(sid) for sid in running},
                                         **{s.seq_id: None for s in pending}}
            break
        if ask and pending:
            t0 = time.perf_counter()
            admit = policy.plan(pending, list(running.values()), kv_budget_tokens, slots)
            if admit:
                admit_set = set(admit)
                if len(admit_set) != len(admit) or any(
                        sid not in by_id or sid in running or sid in finished for sid in admit):
                    raise RuntimeError(f"policy {policy.name!r} admitted unknown, running or repeated ids")
                pending = [s for s in pending if s.seq_id not in admit_set]
            if predictor is not None:
                for sid in admit:
                    predicted[sid] = float(predictor.predict(by_id[sid]))
            stats.scheduler_seconds += time.perf_counter() - t0
            for sid in admit:
                engine.add_request(sid, {"prompt_token_ids": prompt_ids[sid]}, params,
                                   priority=preemption_priority(preemption, predicted.get(sid)))
                running[sid] = by_id[sid]
        if not running:
            raise RuntimeError(f"policy {policy.name!r} stalled: {len(pending)} pending, none admitted")
        stats.peak_running = max(stats.peak_running, len(running))
        outputs = engine.step()
        stats.decode_steps += 1
        done = []
        for out in outputs:
            seq = running.get(out.request_id)
            if seq is None:
                continue
            completion = out.outputs[0]
            latest[out.request_id] = completion
            # exact counts from the engine: requests still queued inside vLLM have none yet
            seq.generated = min(len(completion.token_ids), seq.max_new_tokens)
            if out.finished:
                done.append(seq)
                finished[out.request_id] = completion
        own_kv = sum(s.prompt_tokens + s.generated for s in running.values())
        stats.peak_kv_tokens = max(stats.peak_kv_tokens, own_kv)
        if probe is not None:
            kv = probe.kv_tokens() or 0
            n_run, n_wait = probe.queue_lengths()
            engine_peak_kv = max(engine_peak_kv, kv)
            engine_peak_run, engine_peak_wait = max(engine_peak_run, n_run), max(engine_peak_wait, n_wait)
            if record_timeline:
                timeline.append([stats.decode_steps, own_kv, kv, len(running)])
        ask = bool(done)
        if done:
            t0 = time.perf_counter()
            for seq in done:
                del running[seq.seq_id]
                policy.on_finished(seq, seq.generated)
            stats.scheduler_seconds += time.perf_counter() - t0
    stats.seconds = time.perf_counter() - start
    stats.preemptions = (probe.preemptions - preempt_before) if probe else 0
    recomputed = (probe.recomputed_tokens - recomputed_before) if probe else None
    lengths = [len(c.token_ids) for c in finished.values()]
    stats.generated_tokens = sum(lengths)
    errors = [abs(predicted[sid] - len(c.token_ids)) for sid, c in finished.items() if sid in predicted]
    stats.extra.update(
        policy=policy.name, kv_budget_tokens=int(kv_budget_tokens), slots=int(slots),
        lower_bound=lower_bound_steps(lengths, slots) if lengths else 0,
        kv_lower_bound=kv_lower_bound_steps(lengths, [by_id[sid].prompt_tokens for sid in finished], slots,
                                            kv_budget_tokens),
        predictor_mae=sum(errors) / len(errors) if errors else None,
        engine_peak_kv_tokens=engine_peak_kv if probe and probe.block_pool else None,
        engine_kv_tokens=probe.allocated_tokens if probe and probe.block_pool else None,
        engine_peak_running=engine_peak_run, engine_peak_waiting=engine_peak_wait,
        recomputed_tokens=recomputed,
        engine_kv_lower_bound=engine_kv_lower_bound_steps(
            [(by_id[sid].group_id, by_id[sid].prompt_tokens, len(c.token_ids)) for sid, c in finished.items()],
            probe.cache_tokens, probe.block_size, probe.prefix_caching) if probe and probe.block_pool else None,
    )
    if record_timeline:
        stats.extra["timeline"] = timeline
    return finished, stats


def default_slots(engine: Any) -> int:
    """vLLM's max_num_seqs: the engine never runs more sequences than this at once."""
    return int(engine.vllm_config.scheduler_config.max_num_seqs)

