"""The trainer's weight sync: learner rank 0 -> every engine, then the canary check, and what
happens when an engine is lost on the way (rl/recovery.py).

`SyncedWeights` is a part of `rl.trainer.Trainer` (its base class), split out so that each file
has one job; it uses the trainer's rollout group, learners, weight transport and config.
"""

from __future__ import annotations

import time

from rl.errors import SyncError
from rl.recovery import replace_rollout_worker
from rl.supervision import ActorLost, Watched, supervised_get


class SyncedWeights:
    def sync_weights(self, version: int) -> dict:
        """Learner rank 0 -> every rollout worker (rollout.weight_sync: Ray's shared-memory
        object store on CPU, NCCL broadcast on GPU; rl/weight_sync.py), then the canary check.

        With rollouts in flight (max_staleness > 0) the engines load the weights after them,
        so the check is submitted now and verified before any sample of this version trains.
        An engine lost during the sync is replaced (with a full sync and check of its own) and
        the sync is sent again: a load is idempotent.
        """
        t0 = time.perf_counter()
        in_flight = bool(self.ahead)
        if in_flight and self.config.rollout.partial:
            self.rollout.interrupt()  # the loads need not wait for the longest sequences
        while True:
            try:
                metrics = self.weight_sync.transfer(version, wait=not in_flight)
                break
            except ActorLost as lost:
                if lost.role != "rollout":
                    raise
                replace_rollout_worker(self, lost.index, lost.cause)
        self.submit_check(version)
        if not in_flight:
            self.verify_pending_syncs(up_to=version)
        return {**metrics, **self.last_check, "time/sync": time.perf_counter() - t0}

    def submit_check(self, version: int) -> None:
        """Every engine and the learner score the same canary continuation, at the same time.

        The continuation is sampled once, by the first engine at the first check; afterwards
        each check is one prefill per side (teacher-forced), not 16 decode steps followed by
        the learner's pass.
        """
        self.sample_canary()
        engine_calls = [Watched("rollout", i, w, w.score.remote(self.canary_ids, self.canary_tokens), "score")
                        for i, w in enumerate(self.rollout.workers)]
        learner_ref = self.learners.submit_rank0("score", self.canary_ids, self.canary_tokens)
        self.pending_checks.append((version, engine_calls, learner_ref))

    def sample_canary(self) -> None:
        while self.canary_tokens is None:
            w = self.rollout.workers[0]
            try:
                call = Watched("rollout", 0, w, w.canary.remote(self.canary_ids), "canary")
                self.canary_tokens, _ = supervised_get([call], self.config.trainer.actor_timeout_s)[0]
            except ActorLost as lost:
                replace_rollout_worker(self, lost.index, lost.cause)

    def verify_pending_syncs(self, up_to: int) -> None:
        """Check every submitted sync of version <= up_to; SyncError on a mismatch. An engine
        lost meanwhile is replaced; its replacement was checked when it was brought up."""
        due = [p for p in self.pending_checks if p[0] <= up_to]
        self.pending_checks = [p for p in self.pending_checks if p[0] > up_to]
        loads = {}
        while due:
            try:
                loads = self.weight_sync.finish()
                break
            except ActorLost as lost:
                if lost.role != "rollout":
                    raise
                replace_rollout_worker(self, lost.index, lost.cause)
        for version, engine_calls, learner_ref in due:
            learner_lp = self.learners.wait(learner_ref)
            diffs = []
            for call in engine_calls:
                if call.actor is not self.rollout.workers[call.index]:
                    continue  # replaced since: checked then
                try:
                    rollout_lp = supervised_get([call], self.config.trainer.actor_timeout_s)[0]
                except ActorLost as lost:
                    replace_rollout_worker(self, lost.index, lost.cause)
                    continue
                diffs.extend(self.compare_canary(call.index, version, rollout_lp, learner_lp))
            if diffs:
                self.last_check = {**loads, "sync/max_logprob_diff": max(diffs),
                                   "sync/mean_logprob_diff": sum(diffs) / len(diffs),
                                   "sync/checked_version": float(version)}

    def check_engine(self, index: int, version: int) -> None:
        """The canary check of one engine (a replacement) against the learner, now."""
        self.sample_canary()
        w = self.rollout.workers[index]
        engine_lp = supervised_get([Watched("rollout", index, w, w.score.remote(self.canary_ids, self.canary_tokens),
                                           "score")],
                                   self.config.trainer.actor_timeout_s)[0]
        learner_lp = self.learners.rank0_result("score", self.canary_ids, self.canary_tokens)
        self.compare_canary(index, version, engine_lp, learner_lp)

    def compare_canary(self, index: int, version: int, rollout_lp: list[float], learner_lp: list[float]) -> list:
        """|engine - learner| log-prob per canary token; SyncError when over the tolerance."""
        d = [abs(a - b) for a, b in zip(rollout_lp, learner_lp)]
        # The max catches one badly wrong token; the mean (a quarter of the tolerance)
        # catches a small shift of every token that rounding noise does not produce.
        if max(d) > self.sync_tolerance or sum(d) / len(d) > self.sync_tolerance / 4:
            raise SyncError(
                f"Weight sync check failed on rollout worker {index} (weights version {version}): the engine's "
                f"log-probs of the canary continuation differ from the learner's by up to {max(d):.4g} "
                f"(mean {sum(d) / len(d):.4g}; tolerance {self.sync_tolerance:g} for the max, a quarter "
                f"of it for the mean, trainer.sync_tolerance). The rollout engine is not running the "
                f"learner's weights; training on its samples would be silently off-policy.")
        return d
