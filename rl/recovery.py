"""Recovering from lost actors during a run (what detects them: rl/supervision.py).

- A rollout worker lost (died, or hung past trainer.actor_timeout_s): a replacement with the
  same resources and seed is started, gets a full weight sync at the learner's current
  version and passes the canary check before it samples; RolloutGroup.wait then re-issues the
  lost worker's share of the call. Nothing is regenerated twice, no step is skipped.
- A learner lost: its optimizer state and weights are gone, and the data-parallel group with
  them. The learners are rebuilt from the newest complete checkpoint (from the run's start
  when there is none), the driver's state goes back to that checkpoint, the engines are
  synced to it, and the steps after it run again; their metrics rows are dropped first, so
  every step is logged once.

Each replacement counts against trainer.max_restarts; one more stops the run with the
command that resumes it.
"""

from __future__ import annotations

import json
import sys
import time

from tqdm import tqdm

from rl.errors import TrainingError
from rl.supervision import ActorLost


class Restarts:
    """Replacements made in this run, by role; faults/rollout_restarts and faults/learner_restarts."""

    def __init__(self, max_restarts: int):
        self.max_restarts = max_restarts
        self.count = {"rollout": 0, "learner": 0}

    def add(self, role: str, what: str) -> int:
        """Count one; TrainingError (with the resume command) past trainer.max_restarts."""
        if sum(self.count.values()) >= self.max_restarts:
            from rl.preemption import resume_command

            raise TrainingError(
                f"{what}, and this run already replaced {self.count['rollout']} rollout worker(s) and rebuilt "
                f"its learners {self.count['learner']} time(s) (trainer.max_restarts = {self.max_restarts}). "
                f"Look at the cause above; once it is fixed, resume from the newest checkpoint with:\n  "
                f"{resume_command(sys.argv[1:])}")
        self.count[role] += 1
        return self.count[role]

    def metrics(self) -> dict[str, float]:
        return {"faults/rollout_restarts": float(self.count["rollout"]),
                "faults/learner_restarts": float(self.count["learner"])}


def replace_rollout_worker(trainer, index: int, cause: str) -> None:
    """Start a replacement for rollout worker `index` and bring it to the learner's weights
    (full sync, then the canary check); RolloutGroup.on_lost."""
    t0 = time.perf_counter()
    old = trainer.placement["rollout"][index]
    what = f"rollout worker {index} (pid {old.get('pid')} on node {old['node_id'][:12]}) lost: {cause}"
    n = trainer.restarts.add("rollout", what)
    tqdm.write(f"{what}; starting a replacement (rollout restart {n})")
    trainer.rollout.respawn(index)
    trainer.weight_sync.transfer_to(index, trainer.weights_version)
    trainer.check_engine(index, trainer.weights_version)
    trainer.write_placement(quiet=True)
    new = trainer.placement["rollout"][index]
    tqdm.write(f"rollout worker {index} replaced (pid {new.get('pid')}), synced to weights version "
               f"{trainer.weights_version} and checked, in {time.perf_counter() - t0:.1f} s")


def rebuild_learners(trainer, lost: ActorLost) -> None:
    """Rebuild the learners from the newest complete checkpoint (the run's start without one)
    and put the driver back to it; the trainer then runs the steps after it again."""
    from rl import checkpoints
    from rl.actors import LearnerGroup
    from rl.weight_sync import WeightSync

    t0 = time.perf_counter()
    c = trainer.config
    what = f"{lost.role} actor {lost.index} lost: {lost.cause}"
    n = trainer.restarts.add("learner", what)
    # this run's newest (or the one it resumed from); not an older run's in the same output_dir
    newest = trainer.rollback_checkpoint
    if newest is not None and not checkpoints.is_complete(newest):
        newest = None
    back_to = f"checkpoint {newest}" if newest else "the run's start (no checkpoint yet)"
    tqdm.write(f"{what}; rebuilding the learners from {back_to} (learner restart {n})")
    if lost.role == "rollout":  # lost where no caller could replace it: replace it here
        trainer.rollout.respawn(lost.index)
        trainer.restarts.count["rollout"] += 1
    _drop_rollouts_ahead(trainer)
    trainer.learners.shutdown()
    full_ft = newest is not None and c.model.lora.rank == 0
    trainer.learners = LearnerGroup(c, trainer.prepared.model_path, init_weights_path=str(newest) if full_ft else None)
    if newest is not None:
        trainer.learners.call_all("load_training_state", str(newest))
        trainer.restore_driver_state(json.loads((newest / "trainer_state.json").read_text()), newest)
    else:
        trainer.restore_driver_state(trainer.initial_state, None)
    trainer.weight_sync = WeightSync(trainer.weight_sync.method, trainer.learners.full_weight_readers,
                                     trainer.rollout.workers, trainer.weight_sync.bucket_bytes, c.trainer.actor_timeout_s)
    trainer.logger.truncate_after(trainer.start_step)
    trainer.sync_weights(version=trainer.start_step)
    trainer.write_placement(quiet=True)
    tqdm.write(f"learners rebuilt at step {trainer.start_step} and engines synced in {time.perf_counter() - t0:.1f} s; "
               f"steps {trainer.start_step + 1}.. run again")


def _drop_rollouts_ahead(trainer) -> None:
    """Rollouts submitted ahead were drawn after the checkpoint the run goes back to: their
    prompts are drawn again. Wait them out (interrupted first, with partial rollouts) so the
    engines are idle, and drop them, with the loads and checks queued behind them."""
    if trainer.ahead and trainer.config.rollout.partial:
        trainer.rollout.interrupt()
    while trainer.ahead:
        trainer.rollout.wait(trainer.ahead.popleft().handle)
    trainer.pending_checks.clear()
    trainer.weight_sync.deferred.clear()
