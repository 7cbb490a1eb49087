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

from rl.config import config_to_dict
from rl.errors import ConfigError, SyncError
from rl.learner import LearnerSettings, TrainBatch
from rl.metrics import MetricsLogger
from rl.packing import split_across_ranks
from rollout.records import Sample, SampleRequest

STATE_FILE = "trainer_state.json"


@dataclasses.dataclass
class ScoredBatch:
    """One step's training material: sampled groups with their (shaped) rewards."""

    samples: list[Sample]
    """Sorted by (group_id, sample_index); group ids unique across generation batches."""
    rewards: list[float]
    """[len(samples)] reward after objective shaping (DAPO overlong penalty)."""
    valid: list[bool]
    """[len(samples)] False: dropped by reward.on_error."""
    metrics: dict
    """Rollout, reward, dynamic-sampling and logits-processor metrics over every sample drawn."""
    failures: list[str]
    """Reward failures, one line each."""


class Trainer:
    def __init__(self, prepared):
        from omegaconf import OmegaConf

        from rewards import RewardExecutor
        from rl.actors import LearnerGroup, RolloutGroup, weight_sync_method
        from rl.weight_sync import WeightSync

        self.p = prepared
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
            self.p.prompts.load_state_dict(state["data"])
            self.rollout_extra_args = state.get("rollout_extra_args", self.rollout_extra_args)
            random.setstate(_tuple_state(state["python_rng"]))
        else:
            random.seed(c.trainer.seed)
        self.logger = MetricsLogger(self.out)
        # A fresh run in an old output_dir starts a fresh metrics.jsonl; a resumed one drops
        # the rows logged after its checkpoint. Either way each step appears once.
        self.logger.truncate_after(self.start_step)

        full_ft_resume = resume if (resume and c.model.lora.rank == 0) else None
        settings = LearnerSettings(
            model_path=prepared.model_path, dtype=c.model.dtype, lora_rank=c.model.lora.rank,
            lora_alpha=c.model.lora.alpha, lora_dropout=c.model.lora.dropout,
            lora_target_modules=list(c.model.lora.target_modules), objective=c.objective.name,
            objective_params=dict(c.objective.params), lr=c.learner.lr, weight_decay=c.learner.weight_decay,
            warmup_steps=c.learner.warmup_steps, grad_clip=c.learner.grad_clip,
            micro_batch_tokens=c.learner.micro_batch_tokens, temperature=c.rollout.temperature,
            gradient_checkpointing=c.learner.gradient_checkpointing, seed=c.trainer.seed,
            layout=c.learner.layout, packed_row_tokens=c.learner.packed_row_tokens,
            attn_implementation=c.learner.attn_implementation, strategy=c.learner.strategy,
            init_weights_path=full_ft_resume)
        # Rollout engines are re-seeded on resume so a continued run does not replay samples.
        rollout_seed = c.trainer.seed + 7919 * self.start_step
        self.rollout = RolloutGroup(c, prepared.model_path, rollout_seed,
                                    logits_processors=[self.rollout_processor] if self.rollout_processor else None)
        self.learners = LearnerGroup(c, settings)
        self.weight_sync = WeightSync(weight_sync_method(c), self.learners.exporters, self.rollout.workers,
                                      int(c.rollout.weight_bucket_mb * 2**20))
        if resume:
            self.learners.call_all("load_training_state", resume)
        self.rewards = RewardExecutor(prepared.reward_fns, timeout_s=c.reward.timeout_s,
                                      on_error=c.reward.on_error, error_value=c.reward.error_value,
                                      num_workers=c.reward.workers)
        self.canary_ids = prepared.tokenizer(c.trainer.canary_prompt)["input_ids"]
        self.canary_tokens: list[int] | None = None  # sampled at the first check (verify_sync)
        tol = c.trainer.sync_tolerance
        # 16-bit: the two sides round differently (vLLM keeps bf16 weights and activations, the
        # learner fp32 weights under autocast); measured on SmolLM2: mean 0.02-0.07, max up to
        # 0.23 over 20 steps. A stale or wrong weight shifts every token by ~1.
        self.sync_tolerance = tol if tol is not None else (1e-3 if c.model.dtype == "float32" else 1.0)
        if resume:
            self.sync_weights()  # rollout engines start from model.path; bring them up to date

    def setup_objective(self) -> None:
        """The objective and its driver-side hooks, found as attributes (no if/elif on names):
        HAPO samples through a vLLM logits processor fed with the last step's statistics; DAPO
        shapes rewards and filters groups (dynamic sampling, up to max_gen_batches batches)."""
        from rl.objectives import get_objective

        c = self.config
        self.objective = get_objective(c.objective.name, **c.objective.params)
        self._check_reward_shaping()
        self.rollout_processor = getattr(self.objective, "rollout_logits_processor", None)
        self.rollout_extra_args = (self.objective.rollout_sampling_args(None)
                                   if self.rollout_processor else None)
        self.max_gen_batches = (getattr(self.objective.cfg, "max_gen_batches", 1)
                                if hasattr(self.objective, "keep_groups") else 1)

    # --- one step, top to bottom ------------------------------------------------------

    def fit(self) -> dict:
        c = self.config
        last: dict = {}
        bar = tqdm(range(self.start_step + 1, c.trainer.total_steps + 1), desc="train",
                   initial=self.start_step, total=c.trainer.total_steps, unit="step", dynamic_ncols=True)
        for step in bar:
            t_step = time.perf_counter()
            # prompts -> rollout -> rewards (several generation batches under dynamic sampling)
            bar.set_description_str(f"step {step}: rollout + reward")
            batch = self.sample_and_score()

            bar.set_description_str(f"step {step}: train")
            t0 = time.perf_counter()
            shards, adv_metrics = self.make_train_batches(batch.samples, batch.rewards, batch.valid)
            train_metrics = self.learners.update(shards)
            t_train = time.perf_counter() - t0

            bar.set_description_str(f"step {step}: sync")
            sync_metrics = self.sync_weights()
            if self.rollout_processor:  # HAPO: the next rollout uses this step's entropy statistics
                self.rollout_extra_args = self.objective.rollout_sampling_args(shards[0].batch_stats)

            metrics = {**batch.metrics, **adv_metrics, **train_metrics, **sync_metrics,
                       "time/train": t_train, "time/step": time.perf_counter() - t_step}
            for line in batch.failures[:3]:
                tqdm.write(f"reward failure: {line}")
            if c.trainer.checkpoint_every and step % c.trainer.checkpoint_every == 0 or step == c.trainer.total_steps:
                t0 = time.perf_counter()
                self.save_checkpoint(step)
                metrics["time/checkpoint"] = time.perf_counter() - t0
            self.logger.log(step, metrics)
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", len=f"{metrics['response_length/mean']:.0f}")
            tqdm.write(_summary_line(step, metrics))
            last = {"step": step, **metrics}
        bar.close()
        return last

    def sample_and_score(self) -> ScoredBatch:
        """Prompts -> rollout -> rewards -> objective shaping, in generation batches of
        prompts_per_step prompts. Without a group filter that is one batch. With DAPO's dynamic
        sampling (arXiv:2503.14476) groups whose rewards are all equal (zero advantage, no
        gradient) are dropped and more prompts are drawn until prompts_per_step groups are kept,
        at most max_gen_batches batches; if none is kept, the last batch trains as it is."""
        want = self.config.data.prompts_per_step
        kept: list[tuple[list[Sample], list[float], list[bool]]] = []  # one entry per kept group
        drawn, rollout_rows, reward_rows, raw, failures = [], [], [], [], []
        t_generate = t_reward = 0.0
        num_prompts = 0
        for gen_batch in range(1, self.max_gen_batches + 1):
            prompts = self.p.prompts.next_batch()
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
            rewards = self.shape_rewards(samples, reward.rewards)
            groups = _split_groups(samples, rewards, reward.valid)
            drawn += groups
            kept += [g for g in groups if self.keep_group(g)]
            rollout_rows.append(rollout_stats)
            reward_rows.append(reward.metrics)
            raw += [(r, v) for r, v in zip(reward.rewards, reward.valid)]
            failures += reward.failures
            if len(kept) >= want:
                break
        used = kept[:want] if kept else drawn[-want:]
        all_samples = [s for g in drawn for s in g[0]]
        metrics = {**_rollout_metrics(all_samples, _merge_batches(rollout_rows)), **_merge_batches(reward_rows),
                   **_reward_summary([r for r, _ in raw], [v for _, v in raw]),
                   "time/generate": t_generate, "time/reward": t_reward}
        if hasattr(self.objective, "shape_rewards"):
            shaped = [r for g in used for r, v in zip(g[1], g[2]) if v] or [0.0]
            metrics["reward/shaped_mean"] = statistics.fmean(shaped)
        if hasattr(self.objective, "keep_groups"):
            metrics.update({"dynamic_sampling/gen_batches": float(gen_batch),
                            "dynamic_sampling/kept_groups": float(len(kept)),
                            "dynamic_sampling/dropped_groups": float(len(drawn) - len(kept)),
                            "dynamic_sampling/trained_groups": float(len(used))})
        if self.rollout_processor:
            metrics.update(self.rollout.logits_processor_metrics())
        return ScoredBatch([s for g in used for s in g[0]], [r for g in used for r in g[1]],
                           [v for g in used for v in g[2]], metrics, failures)

    def shape_rewards(self, samples: list[Sample], rewards: list[float]) -> list[float]:
        """The objective's reward shaping (DAPO: overlong penalty on response length), if any."""
        shape = getattr(self.objective, "shape_rewards", None)
        if shape is None:
            return list(rewards)
        lengths = torch.tensor([len(s.response_ids) for s in samples])
        return shape(torch.tensor(rewards, dtype=torch.float64), lengths, max_len=self._max_response_len()).tolist()

    def keep_group(self, group: tuple[list[Sample], list[float], list[bool]]) -> bool:
        """The objective's group filter (DAPO dynamic sampling) on one group's valid samples."""
        keep_groups = getattr(self.objective, "keep_groups", None)
        rewards = [r for r, v in zip(group[1], group[2]) if v]
        if keep_groups is None:
            return True
        if not rewards:
            return False
        return bool(keep_groups(torch.tensor(rewards, dtype=torch.float64),
                                torch.zeros(len(rewards), dtype=torch.long)).all())

    def _max_response_len(self) -> int:
        return self.objective.cfg.max_response_len or self.config.rollout.max_new_tokens

    def _check_reward_shaping(self) -> None:
        """Fail before any actor starts when the shaping cannot work at this response length."""
        if not hasattr(self.objective, "shape_rewards"):
            return
        try:
            self.objective.shape_rewards(torch.zeros(1), torch.zeros(1), max_len=self._max_response_len())
        except ValueError as e:
            raise ConfigError(
                f"objective {self.config.objective.name}: {e} (max response length "
                f"{self._max_response_len()} = objective.max_response_len or rollout.max_new_tokens). "
                f"Fix: set objective.overlong_buffer_len below it (the DAPO paper uses 4096 of 20480), "
                f"or objective.overlong_shaping=false.") from None

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

    def make_train_batches(self, samples: list[Sample], rewards: list[float], valid: list[bool]):
        """Advantages over the whole batch (groups intact), then one shard per learner rank."""
        keep = [i for i, v in enumerate(valid) if v and samples[i].response_ids]
        samples = [samples[i] for i in keep]
        rewards_t = torch.tensor([rewards[i] for i in keep], dtype=torch.float32)
        group = torch.tensor([s.group_id for s in samples], dtype=torch.long)
        T = max(len(s.response_ids) for s in samples)
        mask = torch.zeros(len(samples), T, dtype=torch.bool)
        logp = torch.zeros(len(samples), T)
        for i, s in enumerate(samples):
            mask[i, :len(s.response_ids)] = True
            logp[i, :len(s.logprobs)] = torch.tensor(s.logprobs)
        adv = self.objective.advantages(rewards_t, group, mask, logp=logp)
        norm = self.objective.loss_norm(mask, max_len=self._max_response_len())
        batch_stats = None
        if self.objective.needs_entropy:
            ent_rows = self.learners.call_all("entropies", [s.prompt_ids for s in samples],
                                              [s.response_ids for s in samples])[0]
            entropy = torch.zeros(len(samples), T)
            for i, row in enumerate(ent_rows):
                entropy[i, :len(row)] = torch.tensor(row)
            batch_stats = self.objective.batch_stats(mask, entropy=entropy)
        shards = []
        lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
        for idx in split_across_ranks(lengths, len(self.learners.workers), [s.group_id for s in samples]):
            shards.append(TrainBatch(
                prompt_ids=[samples[i].prompt_ids for i in idx],
                response_ids=[samples[i].response_ids for i in idx],
                advantages=[adv[i, :len(samples[i].response_ids)].tolist() for i in idx],
                rollout_logprobs=[samples[i].logprobs for i in idx],
                num_tokens=norm.num_tokens, num_seqs=norm.num_seqs, max_len=norm.max_len,
                batch_stats=batch_stats))
        valid_adv = adv[mask]
        metrics = {"adv/mean": float(valid_adv.mean()), "adv/std": float(valid_adv.std()) if valid_adv.numel() > 1 else 0.0,
                   "train/sequences": float(len(samples)), "train/dropped_sequences": float(len(valid) - len(samples))}
        metrics.update({k: float(v) for k, v in getattr(self.objective, "last_advantage_metrics", {}).items()})
        return shards, metrics

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
        learner_lp = self.learners.call_rank0("score", self.canary_ids, self.canary_tokens)
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
        self.learners.call_all("save_checkpoint", str(path), self.p.model_path)
        state = {"step": step, "data": self.p.prompts.state_dict(), "python_rng": random.getstate(),
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


def _split_groups(samples: list[Sample], rewards: list[float], valid: list[bool]):
    """Samples sorted by group -> [(samples, rewards, valid)] per group, in group order."""
    groups: dict[int, tuple[list, list, list]] = {}
    for s, r, v in zip(samples, rewards, valid):
        members, group_rewards, group_valid = groups.setdefault(s.group_id, ([], [], []))
        members.append(s)
        group_rewards.append(r)
        group_valid.append(v)
    return [groups[k] for k in sorted(groups)]


# Last part of a metric name whose values add up over a step's generation batches.
_SUMMED = ("seconds", "steps", "count", "none", "errors", "timeouts", "invalid", "unscored",
           "restarts", "preemptions")


def _merge_batches(rows: list[dict]) -> dict:
    """One step's metrics from those of its generation batches: counts and times add up, peaks
    and maxima take the max, minima the min, the rest (means, stds) average over batches."""
    if len(rows) == 1:
        return dict(rows[0])
    out = {}
    for key in rows[0]:
        values = [r[key] for r in rows if key in r]
        last = key.rsplit("/", 1)[-1]
        if "peak" in last or last == "max":
            out[key] = max(values)
        elif last == "min":
            out[key] = min(values)
        elif last.endswith(_SUMMED):
            out[key] = sum(values)
        else:
            out[key] = statistics.fmean(values)
    return out


def _rollout_metrics(samples: list[Sample], stats: dict) -> dict:
    lengths = [len(s.response_ids) for s in samples]
    generated = sum(lengths)
    return {"response_length/mean": statistics.fmean(lengths), "response_length/max": float(max(lengths)),
            "response_length/min": float(min(lengths)),
            "response/truncated_fraction": sum(s.finish_reason == "length" for s in samples) / len(samples),
            "tokens/generated": float(generated),
            "tokens/generated_per_second": generated / max(stats["rollout/seconds"], 1e-9), **stats}


def _reward_summary(rewards: list[float], valid: list[bool]) -> dict:
    kept = [r for r, v in zip(rewards, valid) if v] or [0.0]
    return {"reward/mean": statistics.fmean(kept), "reward/std": statistics.pstdev(kept)}


def _summary_line(step: int, m: dict) -> str:
    return (f"step {step}: reward {m['reward/mean']:.3f} ± {m['reward/std']:.3f} | len {m['response_length/mean']:.1f} "
            f"| loss {m['loss']:+.4f} | entropy {m.get('entropy', float('nan')):.3f} | grad {m['grad_norm']:.3f} "
            f"| sync Δ {m['sync/max_logprob_diff']:.2e} | gen {m['time/generate']:.1f}s train {m['time/train']:.1f}s "
            f"sync {m['time/sync']:.1f}s step {m['time/step']:.1f}s")
