"""The training loop: actors, one step top to bottom, weight sync with verification, checkpoints."""

from __future__ import annotations

import collections
import json
import random
import time
from pathlib import Path

import ray
from tqdm import tqdm

from rl import checkpoints, perf, placement
from rl.batches import ScoredBatch, make_train_shards
from rl.config import config_to_dict
from rl.errors import ConfigError, TrainingError
from rl.metrics import MetricsLogger
from rl.preemption import at_step_end
from rl.recovery import Restarts, rebuild_learners, replace_rollout_worker
from rl.sampling import PendingRollout, StepSampler
from rl.staleness import StalenessControl, staleness_metrics
from rl.step_metrics import summary_line
from rl.sync_check import SyncedWeights
from rl.supervision import ActorLost, Watched, supervised_get

STATE_FILE = "trainer_state.json"


class Trainer(SyncedWeights):
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
        random.seed(c.trainer.seed)
        # What a rollback to the run's start restores (a learner lost before any checkpoint).
        self.initial_state = {"step": 0, "data": prepared.prompts.state_dict(), "python_rng": random.getstate(),
                              "rollout_extra_args": self.rollout_extra_args, "batches_submitted": 0}
        resume = checkpoints.resolve_resume(c.trainer.resume_from, c.trainer.output_dir)[0]  # null, auto or a path
        state = json.loads((Path(resume) / STATE_FILE).read_text()) if resume else None
        self.start_step = int(state["step"]) if state else 0  # the rest of the state: restore_driver_state
        self.rollback_checkpoint: Path | None = Path(resume) if resume else None
        """Where lost learners are rebuilt from: this run's newest checkpoint (rl/recovery.py)."""
        self.logger = MetricsLogger(self.out, loggers=c.trainer.loggers, config=config_to_dict(c))
        # A fresh run in an old output_dir starts a fresh metrics.jsonl; a resumed one drops
        # the rows logged after its checkpoint. Either way each step appears once.
        self.logger.truncate_after(self.start_step)

        # The engines' own seeds no longer decide what they sample: every rollout reseeds them
        # (rl/sampling.py rollout_seed); they still seed vLLM's start-up.
        rollout_seed = c.trainer.seed + 7919 * self.start_step
        processor = self.objective.rollout_logits_processor
        self.rollout = RolloutGroup(c, prepared.model_path, rollout_seed,
                                    logits_processors=[processor] if processor else None)
        self.rollout.on_lost = lambda index, cause: replace_rollout_worker(self, index, cause)
        self.restarts = Restarts(c.trainer.max_restarts)
        full_ft_resume = resume if (resume and c.model.lora.rank == 0) else None
        self.learners = LearnerGroup(c, prepared.model_path, init_weights_path=full_ft_resume)
        self.write_placement()
        self.weight_sync = WeightSync(weight_sync_method(c), self.learners.full_weight_readers,
                                      self.rollout.workers, int(c.rollout.weight_bucket_mb * 2**20),
                                      c.trainer.actor_timeout_s)
        if resume:
            self.learners.call_all("load_training_state", resume)
        r = c.reward
        self.rewards = RewardExecutor(prepared.reward_fns, timeout_s=r.timeout_s, on_error=r.on_error,
                                      error_value=r.error_value, num_workers=r.workers)
        self.canary_ids = prepared.tokenizer(c.trainer.canary_prompt)["input_ids"]
        self.canary_tokens: list[int] | None = None  # sampled at the first check (verify_sync)
        from transformers import AutoConfig

        self.hf_config = AutoConfig.from_pretrained(prepared.model_path)  # for FLOP counts (rl/perf.py)
        # The engines' devices together: one per rollout worker on GPUs, the one shared CPU otherwise.
        gpus = ray.cluster_resources().get("GPU", 0)
        self.rollout_peak = self.learners.rank0_result("peak_tflops") * (c.rollout.workers if gpus else 1)
        self.sampler = StepSampler(c, self.objective, prepared.prompts, self.rollout, self.rewards,
                                   self.max_response_len)
        if resume:
            self.restore_driver_state(state, Path(resume))
        self.weights_version = self.start_step
        """The version of the learner's weights: the updates applied so far."""
        self.staleness = StalenessControl(c.trainer)
        self.evaluator = None
        if c.trainer.eval_every:
            from rl.evaluation import Evaluator

            self.evaluator = Evaluator(c, prepared.tokenizer, self.rollout, self.rewards)
        self.eval_before: dict = {}  # the pre-training evaluation, logged in step 1's row
        self.skipped_steps = self.skipped_in_a_row = 0  # non-finite guard
        self.ahead: collections.deque[PendingRollout] = collections.deque()  # rollouts of later steps
        self.pending_checks: list[tuple[int, list, object]] = []  # syncs not verified yet
        tol = c.trainer.sync_tolerance
        # 16-bit: the two sides round differently (vLLM keeps bf16 weights and activations, the
        # learner fp32 weights under autocast). A stale or wrong weight shifts every token by ~1.
        self.sync_tolerance = tol if tol is not None else (1e-3 if c.model.dtype == "float32" else 1.0)
        self.last_check: dict = {}
        if resume:  # rollout engines start from model.path; bring them up to date
            self.sync_weights(version=self.start_step)

    def restore_driver_state(self, state: dict, checkpoint: Path | None) -> None:
        """The driver's part of a checkpoint's trainer_state.json (`initial_state` for the run's
        start): step, data position, RNG, the objective's sampling arguments, the count of
        generation batches (sampling seeds) and the engines' admission policies."""
        self.start_step = int(state["step"])
        self.prepared.prompts.load_state_dict(state["data"])
        self.rollout_extra_args = state.get("rollout_extra_args", self.rollout_extra_args)
        random.setstate(_tuple_state(state["python_rng"]))
        self.sampler.batches_submitted = int(state.get("batches_submitted", 0))
        for i, w in enumerate(self.rollout.workers):
            path = checkpoint / f"rollout_scheduler_{i}.pkl" if checkpoint else None
            if path is not None and path.exists():
                ray.get(w.load_scheduler_state.remote(path.read_bytes()))

    def write_placement(self, quiet: bool = False) -> None:
        """output_dir/placement.json and a short table in the log: where every actor runs
        (rewritten when an actor is replaced)."""
        from rl.actors import placement

        self.placement = where = placement(self.rollout, self.learners)
        (self.out / "placement.json").write_text(json.dumps(where, indent=1))
        for name, actors in where.items() if not quiet else ():
            for a in actors:
                tqdm.write(f"{name:>8} {a['rank']}: node {a['node_id'][:12]} ({a['node_ip']}) "
                           f"cpus {a['num_cpus']} gpus {a['num_gpus']} torch threads {a.get('torch_threads')} "
                           f"pid {a.get('pid')}")

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
        bar = tqdm(desc="train", initial=self.start_step, total=c.trainer.total_steps, unit="step",
                   dynamic_ncols=True)
        if self.evaluator is not None and self.start_step == 0:
            bar.set_description_str("evaluating before training")
            self.eval_before = self.evaluate(step=0)
        step = self.start_step + 1
        while step <= c.trainer.total_steps:
            try:
                metrics = self.step(step, bar)
            except ActorLost as lost:  # a learner (or an actor lost where no caller replaces it)
                rebuild_learners(self, lost)  # rl/recovery.py: back to the newest checkpoint
                step = self.start_step + 1
                bar.n = self.start_step
                bar.refresh()
                continue
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", len=f"{metrics['response_length/mean']:.0f}")
            tqdm.write(summary_line(step, metrics))
            last = {"step": step, **metrics}
            at_step_end(self, step)  # after SIGTERM/SIGINT: checkpoint this step, raise Preempted (rl/preemption.py)
            step += 1
        bar.close()
        return last

    def step(self, step: int, bar) -> dict:
        """One training step. The learner is at version step - 1 (updates applied so far);
        every sample it trains on was generated at most `max_staleness` versions earlier."""
        c = self.config
        t_step = time.perf_counter()
        bar.set_description_str(f"step {step}: rollout + reward")
        batch = self.sample_and_score()  # prompts -> rollout -> rewards, maybe generated ahead
        self.verify_pending_syncs(up_to=min(s.policy_version for s in batch.samples))

        bar.set_description_str(f"step {step}: train")
        t0 = time.perf_counter()
        # reward failures (and empty responses) may drop whole groups: split what is left
        groups_left = sum(any(v and s.response_ids for s, v in zip(g.samples, g.valid)) for g in batch.groups)
        shards, adv_metrics = make_train_shards(self.objective, batch, len(self.learners.workers),
                                                self.max_response_len,
                                                mini_batches=max(1, min(c.learner.mini_batches, groups_left)))
        update = self.learners.submit_update(shards)
        self.submit_ahead(step)  # later steps' rollouts run while the learner trains
        train_metrics, batch_stats = self.learners.wait(update)
        t_train = time.perf_counter() - t0
        self.weights_version = step
        self.guard_non_finite(step, batch, train_metrics)

        bar.set_description_str(f"step {step}: sync")
        sync_metrics = self.sync_weights(version=step)
        # HAPO: the next rollout samples with this update's entropy statistics
        self.rollout_extra_args = self.objective.rollout_sampling_args(batch_stats)

        metrics = {**batch.metrics, **adv_metrics, **train_metrics, **sync_metrics,
                   **staleness_metrics(batch.samples, learner_version=step - 1),
                   **perf.rollout_metrics(self.hf_config, [len(x.prompt_ids) for x in batch.samples],
                                          [len(x.response_ids) for x in batch.samples],
                                          batch.metrics["time/generate"], self.rollout_peak),
                   "time/train": t_train, "time/step": time.perf_counter() - t_step}
        if step == 1:
            metrics.update(self.eval_before)
        metrics.update(self.restarts.metrics())
        if c.trainer.save_rollouts:
            write_samples(self.out / "rollouts" / f"step_{step}.jsonl", batch)
        if self.evaluator is not None and (step % c.trainer.eval_every == 0 or step == c.trainer.total_steps):
            bar.set_description_str(f"step {step}: evaluating")
            metrics.update(self.evaluate(step))
        self.staleness.observe(metrics)
        metrics["staleness/k"] = float(self.staleness.k)
        for line in batch.failures[:3]:
            tqdm.write(f"reward failure: {line}")
        if c.trainer.checkpoint_every and step % c.trainer.checkpoint_every == 0 or step == c.trainer.total_steps:
            t0 = time.perf_counter()
            self.save_checkpoint(step)
            metrics["time/checkpoint"] = time.perf_counter() - t0
        self.logger.log(step, metrics)
        return metrics

    def guard_non_finite(self, step: int, batch: ScoredBatch, train_metrics: dict) -> None:
        """The learners did not apply a non-finite step (rl/learner/update.py); count it, keep
        its samples for debugging, and stop after trainer.max_skipped_steps in a row."""
        skipped = train_metrics.pop("faults/skipped_step", 0.0) > 0
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
        self.skipped_steps += int(skipped)
        train_metrics["faults/skipped_steps"] = float(self.skipped_steps)
        if not skipped:
            return
        bad = self.out / "bad_steps"
        write_samples(bad / f"step_{step}.jsonl", batch)
        tqdm.write(f"step {step}: loss {train_metrics.get('loss')} / grad norm {train_metrics.get('grad_norm')} "
                   f"is not finite; the update was not applied (samples in {bad / f'step_{step}.jsonl'})")
        if self.skipped_in_a_row >= self.config.trainer.max_skipped_steps:
            raise TrainingError(
                f"{self.skipped_in_a_row} steps in a row had a non-finite loss or gradient norm (trainer."
                f"max_skipped_steps = {self.config.trainer.max_skipped_steps}); their samples are in {bad}. "
                f"Lower learner.lr or check the reward for NaN/inf, then resume with trainer.resume_from=auto "
                f"(the weights are those of the last finite step).")

    def evaluate(self, step: int) -> dict:
        """Held-out reward mean and pass@k with the weights of version `step` (rl/evaluation.py);
        also a row of eval.jsonl. Queued behind any rollout in flight, after the step's load."""
        metrics = self.evaluator.run(self.rollout_extra_args)
        self.logger.log_eval(step, metrics)
        return metrics

    def sample_and_score(self) -> ScoredBatch:
        """The step's scored batch: the oldest rollout submitted ahead, else one started now."""
        first = self.ahead.popleft() if self.ahead else self.sampler.submit(self.rollout_extra_args)
        return self.sampler.collect(first, self.rollout_extra_args)

    def submit_ahead(self, step: int) -> None:
        """Start the rollouts of steps step+1 .. step+k while step's update runs.

        The engines are at version step - 1 until this step's sync, which is submitted after
        these rollouts and so loads after them. A batch for step j trains with the learner at
        version j - 1, so its staleness is (j - 1) - (step - 1) = j - step <= k.
        """
        remaining = self.config.trainer.total_steps - step
        while len(self.ahead) < min(self.staleness.k, remaining):
            self.ahead.append(self.sampler.submit(self.rollout_extra_args))

    # --- checkpoints ------------------------------------------------------------------

    def save_checkpoint(self, step: int) -> Path:
        # Atomic (rl/checkpoints.py): written into .step_N.tmp, renamed to step_N once complete.
        path, tmp = checkpoints.checkpoint_path(self.out, step), checkpoints.begin(self.out, step)
        self.learners.call_all("save_checkpoint", str(tmp), self.prepared.model_path)
        # Rollouts in flight for later steps are not in the checkpoint: a resume draws their
        # prompts again (the data position before the oldest of them), so none is lost or repeated.
        data = self.ahead[0].data_state if self.ahead else self.prepared.prompts.state_dict()
        batches = self.ahead[0].batch_index if self.ahead else self.sampler.batches_submitted
        state = {"step": step, "data": data, "python_rng": random.getstate(), "batches_submitted": batches,
                 "config": config_to_dict(self.config), "rollout_extra_args": self.rollout_extra_args}
        if not self.ahead:  # (with rollouts in flight the policies are mid-rollout; exactness is for k = 0)
            calls = [Watched("rollout", i, w, w.scheduler_state.remote(), "scheduler_state")
                     for i, w in enumerate(self.rollout.workers)]
            for i, blob in enumerate(supervised_get(calls, self.config.trainer.actor_timeout_s)):
                (tmp / f"rollout_scheduler_{i}.pkl").write_bytes(blob)
        (tmp / STATE_FILE).write_text(json.dumps(state))
        checkpoints.commit(tmp, path)
        self.last_saved_step = step
        self.rollback_checkpoint = path
        return path

    def close(self) -> None:
        self.rewards.close()
        self.logger.close()
        self.rollout.shutdown()
        self.learners.shutdown()
        placement.release()  # the actors' placement group (rl/placement.py)


def write_samples(path: Path, batch: ScoredBatch) -> None:
    """A step's samples as JSON lines: ids, text, behavior log-probs, reward, version."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for s, r, v in zip(batch.samples, batch.rewards, batch.valid):
            f.write(json.dumps({"group_id": s.group_id, "sample_index": s.sample_index, "prompt_ids": s.prompt_ids,
                                "response_ids": s.response_ids, "response_text": s.response_text,
                                "logprobs": s.logprobs, "reward": r, "valid": v,
                                "policy_version": s.policy_version}) + "\n")


def _tuple_state(state):
    """JSON turns random.getstate()'s tuples into lists; random.setstate needs tuples."""
    return (state[0], tuple(state[1]), state[2])
