"""Rollout worker: owns one vLLM engine and drives it step by step.

The engine is driven through `add_request` / `step` so that an admission policy from
`scheduling/` (not vLLM's FCFS queue) decides which samples run when. The engine core runs
in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0): weight updates then reach the model
through `collective_rpc` as Python objects, without a second copy through a socket.

A plain class, so tests run it without Ray; `rollout.actor` wraps it as a Ray actor.
"""

from __future__ import annotations

import os
import time
from typing import Any

from rollout.records import RolloutResult, RolloutStats, Sample, SampleRequest


def _configure_vllm_env(num_threads: int | None) -> None:
    # Must be set before vLLM creates the engine: in-process engine core (see module doc).
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # vLLM lowers torch to 1 thread "for serving" unless OMP_NUM_THREADS is set, and Ray sets
    # it to 1 in actors that reserve no CPU. Rollout is the only thing running during the
    # generate phase, so it should use every core it has.
    os.environ["OMP_NUM_THREADS"] = str(num_threads or os.cpu_count() or 1)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")


class RolloutWorker:
    """A vLLM engine plus the sampling loop of one rollout worker.

    Args:
        model_path: Hugging Face model directory (or hub name).
        dtype: weights dtype for vLLM (bfloat16 | float16 | float32).
        max_model_len: prompt + response tokens per sequence.
        gpu_memory_utilization: vLLM memory fraction (on CPU: of the node's RAM).
        seed: engine seed (per-request seeds crash the CPU backend, so the engine is seeded).
        policy: admission policy name from `scheduling` (full_group, naive_micro, continuous, length_aware).
        policy_kwargs: its keyword arguments.
        kv_budget_tokens: KV tokens the policy may fill; None derives it from the engine's cache.
        slots: most sequences in flight; None = no limit beyond the KV budget.
        logits_processors: vLLM V1 logits processor classes (e.g. HAPO's adaptive temperature).
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
        slots: int | None = None,
        logits_processors: list | None = None,
        num_threads: int | None = None,
    ):
        _configure_vllm_env(num_threads)
        from vllm import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        from scheduling import make_policy

        args = EngineArgs(
            model=model_path,
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            enable_prefix_caching=True,  # the G samples of a prompt share its KV prefix
            logits_processors=logits_processors or None,
            disable_log_stats=True,
        )
        self.engine = LLMEngine.from_engine_args(args)
        self.tokenizer = self.engine.get_tokenizer()
        self.policy = make_policy(policy, **(policy_kwargs or {}))
        self.cache_tokens = self._engine_cache_tokens()
        self.kv_budget_tokens = kv_budget_tokens or self.cache_tokens
        self.slots = slots or self.engine.vllm_config.scheduler_config.max_num_seqs
        self._request_counter = 0
        self._count_preemptions()

    # --- generation -------------------------------------------------------------------

    def _engine_cache_tokens(self) -> int:
        cache = self.engine.vllm_config.cache_config
        blocks = cache.num_gpu_blocks or 0
        return int(blocks * cache.block_size)

    def generate(self, requests: list[SampleRequest], group_size: int, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0,
                 extra_args: dict | None = None) -> RolloutResult:
        """Sample `group_size` responses for every request.

        Every one of the len(requests) x group_size samples comes back exactly once, in
        (request, sample_index) order, whatever order the policy admitted them in.
        """
        from vllm import SamplingParams

        from scheduling import Seq

        params = SamplingParams(
            temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, logprobs=0,
            extra_args=extra_args or None,
        )
        seqs: dict[str, Seq] = {}
        prompts: dict[str, tuple[int, int, list[int]]] = {}
        for req in requests:
            for k in range(group_size):
                rid = f"r{self._request_counter}"
                self._request_counter += 1
                seqs[rid] = Seq(rid, req.group_id, len(req.prompt_ids), max_new_tokens,
                                prompt_ids=tuple(req.prompt_ids))
                prompts[rid] = (req.group_id, k, req.prompt_ids)

        stats = RolloutStats()
        start = time.perf_counter()
        self.policy.begin_rollout(list(seqs.values()))
        pending = list(seqs.values())
        running: dict[str, Seq] = {}
        finished: dict[str, Any] = {}
        preempt_before = self._preemptions()
        while pending or running:
            t0 = time.perf_counter()
            admit = self.policy.plan(pending, list(running.values()), self.kv_budget_tokens, self.slots)
            stats.scheduler_seconds += time.perf_counter() - t0
            if admit:
                admit_set = set(admit)
                for seq in [s for s in pending if s.seq_id in admit_set]:
                    self.engine.add_request(seq.seq_id, {"prompt_token_ids": prompts[seq.seq_id][2]}, params)
                    running[seq.seq_id] = seq
                pending = [s for s in pending if s.seq_id not in admit_set]
            stats.peak_running = max(stats.peak_running, len(running))
            stats.peak_kv_tokens = max(stats.peak_kv_tokens,
                                       sum(s.prompt_tokens + s.generated for s in running.values()))
            outputs = self.engine.step()
            stats.decode_steps += 1
            for seq in running.values():
                seq.generated += 1
            for out in outputs:
                if out.finished:
                    seq = running.pop(out.request_id)
                    completion = out.outputs[0]
                    seq.generated = len(completion.token_ids)
                    finished[out.request_id] = completion
                    t0 = time.perf_counter()
                    self.policy.on_finished(seq, seq.generated)
                    stats.scheduler_seconds += time.perf_counter() - t0
        stats.seconds = time.perf_counter() - start
        stats.preemptions = self._preemptions() - preempt_before

        samples = []
        for rid in seqs:
            group_id, k, prompt_ids = prompts[rid]
            c = finished[rid]
            token_ids = list(c.token_ids)
            logprobs = [step[tok].logprob for step, tok in zip(c.logprobs, token_ids)]
            samples.append(Sample(group_id, k, list(prompt_ids), token_ids, c.text, logprobs,
                                  c.finish_reason or "stop"))
            stats.generated_tokens += len(token_ids)
        return RolloutResult(samples, stats)

    def _count_preemptions(self) -> None:
        """Wrap the in-process scheduler's preempt hook with a counter.

        vLLM keeps a per-request count only; a good plan has none, and this makes any visible.
        """
        self._num_preemptions = 0
        core = getattr(self.engine.engine_core, "engine_core", None)
        scheduler = getattr(core, "scheduler", None)
        original = getattr(scheduler, "_preempt_request", None)
        if original is None:
            return

        def counted(*args, **kwargs):
            self._num_preemptions += 1
            return original(*args, **kwargs)

        scheduler._preempt_request = counted

    def _preemptions(self) -> int:
        return self._num_preemptions

    # --- weights ----------------------------------------------------------------------

    def load_weights(self, named_tensors: dict[str, Any]) -> dict[str, float]:
        """Load new weights in place (HF names -> tensors); returns seconds and bytes."""
        from rollout.weights import load_weights_into_worker

        start = time.perf_counter()
        self.engine.collective_rpc(load_weights_into_worker, args=(named_tensors,))
        # Cached prefixes were computed with the old weights.
        self.engine.reset_prefix_cache()
        nbytes = sum(t.numel() * t.element_size() for t in named_tensors.values())
        return {"seconds": time.perf_counter() - start, "bytes": float(nbytes)}

    def canary(self, prompt_ids: list[int], num_tokens: int = 16) -> tuple[list[int], list[float]]:
        """Sample `num_tokens` tokens after `prompt_ids`; return them with the engine's log-probs.

        The learner scores the same tokens; equal log-probs prove the weights arrived.
        """
        from vllm import SamplingParams

        params = SamplingParams(temperature=1.0, max_tokens=num_tokens, min_tokens=num_tokens,
                                ignore_eos=True, logprobs=0)
        rid = f"canary{self._request_counter}"
        self._request_counter += 1
        self.engine.add_request(rid, {"prompt_token_ids": list(prompt_ids)}, params)
        result = None
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished and out.request_id == rid:
                    result = out.outputs[0]
        token_ids = list(result.token_ids)
        return token_ids, [step[t].logprob for step, t in zip(result.logprobs, token_ids)]

    def logits_processor_metrics(self) -> dict[str, float]:
        """Metrics the custom logits processors gathered since the last call, then reset
        (HAPO: the adaptive temperatures applied); {} without such processors."""
        from rollout.hapo_temperature import pop_processor_metrics

        return self.engine.collective_rpc(pop_processor_metrics)[0]

    def info(self) -> dict:
        return {"cache_tokens": self.cache_tokens, "kv_budget_tokens": self.kv_budget_tokens,
                "slots": self.slots, "pid": os.getpid()}
