"""The training loop: actors, one step top to bottom, weight sync with verification, checkpoints."""

from __future__ import annotations

import dataclasses
import json
import random
import statistics
import time
from pathlib import Path

import ray
import torch
from tqdm import tqdm

from rl.batches import ScoredBatch, ScoredGroup, make_train_shards, split_groups
from rl.config import config_to_dict
from rl.errors import ConfigError, SyncError
from rl.metrics import MetricsLogger
from rl.step_metrics import merge_batches, reward_summary, rollout_metrics, summary_line
from rollout.records import Sample, SampleRequest

STATE_FILE = "trainer_state.json"


class Trainer:
    def __init__(self, prepared):
        from omegaconf import OmegaConf

        from rewards import RewardExecutor
        from rl.actors import LearnerGroup, RolloutGroup, weight_sync_method
        from rl.weight_sync import WeightSync

        self.prepared = prepared
        self.config = c = prepared.config
        self.out = Path(c.trainer.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(config_to_dict(c)), self.out / "config.yaml")
        self.setup_objective()
        self.start_step = 0
        resume = c.trainer.resume_from
        if resume:
            state = json.loads((Path(resume) / STATE_FILE).read_text())
            self.start_step = int(state["step"])
            prepared.prompts.load_state_dict(state["data"])
            self.rollout_extra_args = state.get("rollout_extra_args", self.rollout_extra_args)
            random.setstate(_tuple_state(state["python_rng"]))
        else:
            random.seed(c.trainer.seed)
        self.logger = MetricsLogger(self.out)
        # A fresh run in an old output_dir starts a fresh metrics.jsonl; a resumed one drops
        # the rows logged after its checkpoint. Either way each step appears once.
        self.logger.truncate_after(self.start_step)

        # Rollout engines are re-seeded on resume so a continued run does not replay samples.
        rollout_seed = c.trainer.seed + 7919 * self.start_step
        processor = self.objective.rollout_logits_processor
        self.rollout = RolloutGroup(c, prepared.model_path, rollout_seed,
                                    logits_processors=[processor] if processor else None)
        full_ft_resume = resume if (resume and c.model.lora.rank == 0) else None
        self.learners = LearnerGroup(c, prepared.model_path, init_weights_path=full_ft_resume)
        self.weight_sync = WeightSync(weight_sync_method(c), self.learners.full_weight_readers,
                                      self.rollout.workers, int(c.rollout.weight_bucket_mb * 2**20))
        if resume:
            self.learners.call_all("load_training_state", resume)
        r = c.reward
        self.rewards = RewardExecutor(prepared.reward_fns, timeout_s=r.timeout_s, on_error=r.on_error,
                                      error_value=r.error_value, num_workers=r.workers)
        self.canary_ids = prepared.tokenizer(c.trainer.canary_prompt)["input_ids"]
        self.canary_tokens: list[int] | None = None  # sampled at the first check (verify_sync)
        tol = c.trainer.sync_tolerance
        # 16-bit: the two sides round differently (vLLM keeps bf16 weights and activations, the
        # learner fp32 weights under autocast). A stale or wrong weight shifts every token by ~1.
        self.sync_tolerance = tol if tol is not None else (1e-3 if c.model.dtype == "float32" else 1.0)
        if resume:
            self.sync_weights()  # rollout engines start from model.path; bring them up to date

    def setup_objective(self) -> None:
        """The objective, checked against the response length before any actor starts, and the
        sampling arguments of the first rollout (HAPO: none of its statistics yet)."""
        self.objective = self.config.objective.build()
        self.max_response_len = self.objective.cfg.max_response_len or self.config.rollout.max_new_tokens
        try:
            self.objective.check_response_length(self.max_response_len)
        except ValueError as e:
            raise ConfigError(
                f"objective {self.config.objective.name}: {e} (max response length {self.max_response_len} = "
                f"objective.max_response_len or rollout.max_new_tokens). Fix: set objective.overlong_buffer_len "
                f"below it (the DAPO paper uses 4096 of 20480), or objective.overlong_shaping=false.") from None
        self.rollout_extra_args = self.objective.rollout_sampling_args(None)

    # --- one step, top to bottom ------------------------------------------------------

    def fit(self) -> dict:
        c = self.config
        last: dict = {}
        bar = tqdm(range(self.start_step + 1, c.trainer.total_steps + 1), desc="train",
                   initial=self.start_step, total=c.trainer.total_steps, unit="step", dynamic_ncols=True)
        for step in bar:
            metrics = self.step(step, bar)
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", len=f"{metrics['response_length/mean']:.0f}")
            tqdm.write(summary_line(step, metrics))
            last = {"step": step, **metrics}
        bar.close()
        return last

    def step(self, step: int, bar) -> dict:
        c = self.config
        t_step = time.perf_counter()
        bar.set_description_str(f"step {step}: rollout + reward")
        batch = self.sample_and_score()  # prompts -> rollout -> rewards (-> more, under dynamic sampling)

        bar.set_description_str(f"step {step}: train")
        t0 = time.perf_counter()
        shards, adv_metrics = make_train_shards(self.objective, batch, len(self.learners.workers),
                                                self.max_response_len)
        train_metrics, batch_stats = self.learners.update(shards)
        t_train = time.perf_counter() - t0

        bar.set_description_str(f"step {step}: sync")
        sync_metrics = self.sync_weights()
        # HAPO: the next rollout samples with this update's entropy statistics
        self.rollout_extra_args = self.objective.rollout_sampling_args(batch_stats)

        metrics = {**batch.metrics, **adv_metrics, **train_metrics, **sync_metrics,
                   "time/train": t_train, "time/step": time.perf_counter() - t_step}
        for line in batch.failures[:3]:
            tqdm.write(f"reward failure: {line}")
        if c.trainer.checkpoint_every and step % c.trainer.checkpoint_every == 0 or step == c.trainer.total_steps:
            t0 = time.perf_counter()
            self.save_checkpoint(step)
            metrics["time/checkpoint"] = time.perf_counter() - t0
        self.logger.log(step, metrics)
        return metrics

    def sample_and_score(self) -> ScoredBatch:
        """Prompts -> rollout -> rewards -> objective shaping, in generation batches of
        prompts_per_step prompts. Without dynamic sampling that is one batch. With DAPO's
        (arXiv:2503.14476) groups the objective does not keep (all rewards equal: zero
        advantage, no gradient) are dropped and more prompts are drawn until prompts_per_step
        groups are kept, at most max_gen_batches batches; if none is kept, the last batch
        trains as it is."""
        want = self.config.data.prompts_per_step
        obj = self.objective
        drawn: list[ScoredGroup] = []
        kept: list[ScoredGroup] = []
        rollout_rows, reward_rows, raw, failures = [], [], [], []
        t_generate = t_reward = 0.0
        num_prompts = 0
        for gen_batch in range(1, obj.max_gen_batches + 1):
            prompts = self.prepared.prompts.next_batch()
            t0 = time.perf_counter()
            samples, rollout_stats = self.generate(prompts)
            t_generate += time.perf_counter() - t0

            t0 = time.perf_counter()
            reward = self.rewards.score(
                [prompts[s.group_id].text for s in samples], [s.response_text for s in samples],
                _columns(prompts, samples), [s.group_id for s in samples])
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
            rollout_rows.append(rollout_stats)
            reward_rows.append(reward.metrics)
            raw += list(zip(reward.rewards, reward.valid))
            failures += reward.failures
            if len(kept) >= want:
                break
        used = kept[:want] if kept else drawn[-want:]
        metrics = {**rollout_metrics([s for g in drawn for s in g.samples], merge_batches(rollout_rows)),
                   **merge_batches(reward_rows), **reward_summary([r for r, _ in raw], [v for _, v in raw]),
                   "time/generate": t_generate, "time/reward": t_reward}
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

    def keep_group(self, group: ScoredGroup) -> bool:
        """The objective's group filter (DAPO dynamic sampling) on one group's valid samples."""
        rewards = group.valid_rewards()
        if not rewards:
            return False
        return bool(self.objective.keep_groups(torch.tensor(rewards, dtype=torch.float64),
                                               torch.zeros(len(rewards), dtype=torch.long)).all())

    def generate(self, prompts) -> tuple[list[Sample], dict]:
        r = self.config.rollout
        requests = [SampleRequest(i, p.token_ids) for i, p in enumerate(prompts)]
        results = self.rollout.generate(requests, group_size=r.group_size, max_new_tokens=r.max_new_tokens,
                                        temperature=r.temperature, top_p=r.top_p,
                                        extra_args=self.rollout_extra_args)
        samples = sorted((s for res in results for s in res.samples), key=lambda s: (s.group_id, s.sample_index))
        stats = [res.stats for res in results]
        return samples, {
            "rollout/seconds": max(s.seconds for s in stats),
            "rollout/decode_steps": max(s.decode_steps for s in stats),
            "rollout/peak_running": sum(s.peak_running for s in stats),
            "rollout/peak_kv_tokens": sum(s.peak_kv_tokens for s in stats),
            "rollout/preemptions": sum(s.preemptions for s in stats),
            "rollout/scheduler_seconds": sum(s.scheduler_seconds for s in stats),
        }

    # --- weights ----------------------------------------------------------------------

    def sync_weights(self) -> dict:
        """Learner rank 0 -> every rollout worker (rollout.weight_sync: Ray's shared-memory
        object store on CPU, NCCL broadcast on GPU; rl/weight_sync.py), then verify on a
        canary prompt."""
        t0 = time.perf_counter()
        metrics = self.weight_sync.transfer()
        max_diff, mean_diff = self.verify_sync()
        return {**metrics, "sync/max_logprob_diff": max_diff, "sync/mean_logprob_diff": mean_diff,
                "time/sync": time.perf_counter() - t0}

    def verify_sync(self) -> tuple[float, float]:
        """Every engine and the learner score the same canary continuation, at the same time.

        The continuation is sampled once, by the first engine at the first check; afterwards
        each check is one prefill per side (teacher-forced), not 16 decode steps followed by
        the learner's pass.
        """
        if self.canary_tokens is None:
            self.canary_tokens, _ = ray.get(self.rollout.workers[0].canary.remote(self.canary_ids))
        engine_refs = [w.score.remote(self.canary_ids, self.canary_tokens) for w in self.rollout.workers]
        learner_lp = self.learners.rank0_result("score", self.canary_ids, self.canary_tokens)
        diffs = []
        for i, rollout_lp in enumerate(ray.get(engine_refs)):
            d = [abs(a - b) for a, b in zip(rollout_lp, learner_lp)]
            diffs.extend(d)
            # The max catches one badly wrong token; the mean (a quarter of the tolerance) catches
            # a small shift of every token that rounding noise does not produce.
            if max(d) > self.sync_tolerance or sum(d) / len(d) > self.sync_tolerance / 4:
                raise SyncError(
                    f"Weight sync check failed on rollout worker {i}: the engine's log-probs of the canary "
                    f"continuation differ from the learner's by up to {max(d):.4g} (mean {sum(d) / len(d):.4g}; "
                    f"tolerance {self.sync_tolerance:g} for the max, a quarter of it for the mean, "
                    f"trainer.sync_tolerance). The rollout engine is not running the learner's weights; "
                    f"training on its samples would be silently off-policy.")
        return max(diffs), sum(diffs) / len(diffs)

    # --- checkpoints ------------------------------------------------------------------

    def save_checkpoint(self, step: int) -> Path:
        path = self.out / "checkpoints" / f"step_{step}"
        self.learners.call_all("save_checkpoint", str(path), self.prepared.model_path)
        state = {"step": step, "data": self.prepared.prompts.state_dict(), "python_rng": random.getstate(),
                 "config": config_to_dict(self.config), "rollout_extra_args": self.rollout_extra_args}
        (path / STATE_FILE).write_text(json.dumps(state))
        return path

    def close(self) -> None:
        self.rewards.close()
        self.logger.close()
        self.rollout.shutdown()
        self.learners.shutdown()


def _tuple_state(state):
    """JSON turns random.getstate()'s tuples into lists; random.setstate needs tuples."""
    return (state[0], tuple(state[1]), state[2])


def _columns(prompts, samples: list[Sample]) -> dict[str, list]:
    keys = sorted({k for p in prompts for k in p.columns})
    cols = {k: [prompts[s.group_id].columns.get(k) for s in samples] for k in keys}
    cols["completion_ids"] = [s.response_ids for s in samples]
    return cols
