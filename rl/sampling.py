"""A step's training material: prompts -> rollout (submitted, possibly ahead) -> rewards ->
objective shaping -> scored groups, with DAPO's dynamic sampling.

`submit` starts the generation of a step's first batch and returns at once; `collect` waits
for it, scores it and, under dynamic sampling, draws further batches until enough groups are
kept. The trainer submits ahead of training when `trainer.max_staleness` allows it.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from rl.batches import ScoredBatch, ScoredGroup, split_groups
from rl.step_metrics import merge_batches, reward_summary, rollout_metrics
from rollout.records import Sample, SampleRequest


@dataclasses.dataclass
class PendingRollout:
    """A generation batch in flight."""

    prompts: list
    handle: object
    """What `RolloutGroup.wait` takes."""
    submitted_at: float
    data_state: dict
    """The prompt source's position before these prompts were drawn: a checkpoint taken while
    this batch is in flight resumes from here, so its prompts are generated again, not lost."""
    batch_index: int
    """Generation batches submitted before this one in the run (its sampling seed derives from it)."""


class StepSampler:
    """Args: config (the run's Config), objective, prompts (rl.data.PromptSource), rollout
    (rl.actors.RolloutGroup or a stand-in with submit/wait/logits_processor_metrics), rewards
    (rewards.RewardExecutor or a stand-in with score), max_response_len."""

    def __init__(self, config, objective, prompts, rollout, rewards, max_response_len: int):
        self.config, self.objective = config, objective
        self.prompts, self.rollout, self.rewards = prompts, rollout, rewards
        self.max_response_len = max_response_len
        self.batches_submitted = 0
        """Generation batches submitted so far (checkpointed with the data position)."""

    def submit(self, extra_args: dict | None) -> PendingRollout:
        """Draw the next prompts_per_step prompts and start sampling them, with a sampling seed
        that depends only on trainer.seed and the batch's index in the run (exact resume)."""
        r = self.config.rollout
        data_state = self.prompts.state_dict()
        prompts = self.prompts.next_batch()
        requests = [SampleRequest(i, p.token_ids) for i, p in enumerate(prompts)]
        index = self.batches_submitted
        self.batches_submitted += 1
        handle = self.rollout.submit(requests, group_size=r.group_size, max_new_tokens=r.max_new_tokens,
                                     temperature=r.temperature, top_p=r.top_p, extra_args=extra_args,
                                     seed=rollout_seed(self.config.trainer.seed, index))
        return PendingRollout(prompts, handle, time.perf_counter(), data_state, index)

    def collect(self, first: PendingRollout, extra_args: dict | None) -> ScoredBatch:
        """Wait for `first`, score it, and under dynamic sampling (DAPO, arXiv:2503.14476) drop
        the groups the objective does not keep (all rewards equal: zero advantage, no gradient)
        and draw more batches until prompts_per_step groups are kept, at most max_gen_batches
        batches; if none is kept, the last batch trains as it is."""
        want = self.config.data.prompts_per_step
        obj = self.objective
        drawn: list[ScoredGroup] = []
        kept: list[ScoredGroup] = []
        rollout_rows, reward_rows, raw, failures = [], [], [], []
        t_generate = t_reward = t_wait = 0.0
        num_prompts = 0
        interrupted = 0  # samples a weight update interrupted (partial rollouts), resumed
        pending = first
        for gen_batch in range(1, obj.max_gen_batches + 1):
            if pending is None:
                pending = self.submit(extra_args)
            t0 = time.perf_counter()
            results = self.rollout.wait(pending.handle)
            resumed = self.resume_interrupted(results, extra_args)
            interrupted += sum(len(res.samples) for res in resumed)
            results += resumed
            t_wait += time.perf_counter() - t0
            samples = sorted((s for res in results for s in res.samples), key=lambda s: (s.group_id, s.sample_index))
            stats = _rollout_stats([res.stats for res in results if res.stats is not None])
            t_generate += stats["rollout/seconds"]
            prompts, pending = pending.prompts, None

            t0 = time.perf_counter()
            reward = self.rewards.score(
                [prompts[s.group_id].text for s in samples], [s.response_text for s in samples],
                reward_columns(prompts, samples), [s.group_id for s in samples])
            t_reward += time.perf_counter() - t0

            # group ids (prompt indices) unique across the step's generation batches
            samples = [dataclasses.replace(s, group_id=s.group_id + num_prompts) for s in samples]
            num_prompts += len(prompts)
            lengths = torch.tensor([len(s.response_ids) for s in samples])
            rewards = obj.shape_rewards(torch.tensor(reward.rewards, dtype=torch.float64), lengths,
                                        max_len=self.max_response_len).tolist()
            groups = split_groups(samples, rewards, reward.valid)
            drawn += groups
            kept += [g for g in groups if self.keep_group(g)]
            rollout_rows.append(stats)
            reward_rows.append(reward.metrics)
            raw += list(zip(reward.rewards, reward.valid))
            failures += reward.failures
            if len(kept) >= want:
                break
        used = kept[:want] if kept else drawn[-want:]
        metrics = {**rollout_metrics([s for g in drawn for s in g.samples], merge_batches(rollout_rows)),
                   **merge_batches(reward_rows), **reward_summary([r for r, _ in raw], [v for _, v in raw]),
                   "time/generate": t_generate, "time/reward": t_reward, "time/wait_rollout": t_wait,
                   "rollout/resumed_samples": float(interrupted)}
        if obj.shapes_rewards:
            metrics["reward/shaped_mean"] = statistics.fmean([r for g in used for r in g.valid_rewards()] or [0.0])
        if obj.uses_dynamic_sampling:
            metrics.update({"dynamic_sampling/gen_batches": float(gen_batch),
                            "dynamic_sampling/kept_groups": float(len(kept)),
                            "dynamic_sampling/dropped_groups": float(len(drawn) - len(kept)),
                            "dynamic_sampling/trained_groups": float(len(used))})
        if obj.rollout_logits_processor:
            metrics.update(self.rollout.logits_processor_metrics())
        return ScoredBatch(used, metrics, failures)

    def resume_interrupted(self, results: list, extra_args: dict | None) -> list:
        """Partial rollouts: continue the samples a weight update interrupted, from their
        prefixes under the newer weights, until every one has finished."""
        r = self.config.rollout
        more = []
        unfinished = [p for res in results for p in res.unfinished]
        while unfinished:
            resumed = self.rollout.wait(self.rollout.submit_resume(unfinished, temperature=r.temperature,
                                                                   top_p=r.top_p, extra_args=extra_args))
            more += resumed
            unfinished = [p for res in resumed for p in res.unfinished]
        return more

    def keep_group(self, group: ScoredGroup) -> bool:
        """The objective's group filter (DAPO dynamic sampling) on one group's valid samples."""
        rewards = group.valid_rewards()
        if not rewards:
            return False
        return bool(self.objective.keep_groups(torch.tensor(rewards, dtype=torch.float64),
                                               torch.zeros(len(rewards), dtype=torch.long)).all())


def rollout_seed(seed: int, batch_index: int) -> int:
    """The sampling seed of the run's batch_index-th generation batch (RolloutGroup adds the
    worker's index): distinct per batch, the same in a straight and a resumed run."""
    return (seed * 1_000_003 + batch_index * 7919 + 1) % 2**31


def _rollout_stats(stats: list) -> dict:
    """One generation batch's measures over the workers (they run side by side): times and
    step counts of the slowest, memory and counts summed over the engines.

    KV tokens: kv_budget_tokens (what the policies may fill), engine_kv_tokens (allocated:
    blocks x block size), peak_kv_tokens (the engines' blocks in use at peak x block size, as
    vLLM reports them), planned_peak_kv_tokens (the policies' own count, prompt + generated per
    running sequence, no prefix sharing). lower_bound_steps: the KV-aware lower bound on decode
    steps (`scheduling.kv_lower_bound_steps`); predictor_mae: |predicted - produced| output
    length of the length predictor, mean over the workers that have one."""
    extra = [s.extra for s in stats]
    out = {
        "rollout/seconds": max(s.seconds for s in stats),
        "rollout/decode_steps": max(s.decode_steps for s in stats),
        "rollout/peak_running": sum(s.peak_running for s in stats),
        "rollout/planned_peak_kv_tokens": sum(s.peak_kv_tokens for s in stats),
        "rollout/preemptions": sum(s.preemptions for s in stats),
        "rollout/scheduler_seconds": sum(s.scheduler_seconds for s in stats),
    }
    summed = {"rollout/kv_budget_tokens": "kv_budget_tokens", "rollout/engine_kv_tokens": "engine_kv_tokens",
              "rollout/peak_kv_tokens": "engine_peak_kv_tokens"}
    for name, key in summed.items():
        values = [x[key] for x in extra if x.get(key) is not None]
        if values:
            out[name] = sum(values)
    bounds = [x["kv_lower_bound"] for x in extra if x.get("kv_lower_bound") is not None]
    if bounds:
        out["rollout/lower_bound_steps"] = max(bounds)
    encode = [x["prompt_encoder_seconds"] for x in extra if x.get("prompt_encoder_seconds") is not None]
    if encode:  # the egtp predictor's cost: one forward over the step's prompts per worker
        out["rollout/prompt_encoder_seconds"] = max(encode)
    errors = [x["predictor_mae"] for x in extra if x.get("predictor_mae") is not None]
    if errors:
        out["rollout/predictor_mae"] = sum(errors) / len(errors)
    return out


def reward_columns(prompts, samples: list[Sample]) -> dict[str, list]:
    """The reward functions' keyword columns: every dataset column of each sample's prompt,
    and the sampled token ids (`completion_ids`, as TRL passes them)."""
    keys = sorted({k for p in prompts for k in p.columns})
    cols = {k: [prompts[s.group_id].columns.get(k) for s in samples] for k in keys}
    cols["completion_ids"] = [s.response_ids for s in samples]
    return cols
