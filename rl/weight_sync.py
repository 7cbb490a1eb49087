"""Moving the learner's weights to every rollout engine, by the method `rollout.weight_sync` names.

object_store: learner rank 0 casts its weights into one flat buffer, Ray's shared-memory object
    store carries it, each engine reads it zero-copy and reloads (rollout/weights.py). Fastest
    on one CPU node.
broadcast: learner rank 0 and the engines form one process group at start-up; every sync is a
    bucketed broadcast that each engine loads as it arrives, through vLLM's weight-transfer
    API (rollout/weight_broadcast.py). NCCL on GPU, so the weights never leave GPU memory.

Either way the caller verifies the result (Trainer.verify_sync).
"""

from __future__ import annotations

import time

import ray

from rl.errors import SyncError
from rl.supervision import Watched, supervised_get


class WeightSync:
    """Learner rank 0 -> rollout engines; `transfer()` once per step."""

    def __init__(self, method: str, learners: list, rollout_workers: list, bucket_bytes: int,
                 timeout_s: float = 120.0):
        """learners: [rank 0] when it holds the whole model; every rank, rank 0 first, when the
        model is sharded (fsdp): they all take part in gathering the weights, rank 0 sends.
        rollout_workers: RolloutGroup.workers itself (a replaced worker appears here in place).
        timeout_s: trainer.actor_timeout_s; a lost actor raises ActorLost (rl/supervision.py)."""
        self.timeout_s = timeout_s
        self.bucket_bytes = bucket_bytes
        if method not in ("object_store", "broadcast"):
            raise ValueError(f"weight sync method {method!r}: use object_store or broadcast")
        self.method = method
        self.learner = learners[0]
        self.gathering_ranks = list(learners[1:])  # fsdp: they take part in gathering, rank 0 sends
        self.workers = rollout_workers
        self.metas: list = []
        self.deferred: list[tuple[list, float]] = []  # object_store loads queued behind rollouts in flight
        if method == "broadcast":
            self._join(bucket_bytes)

    def _join(self, bucket_bytes: int) -> None:
        """Form the group: learner rank 0 is group rank 0, engine i is group rank i + 1. Every
        member blocks in the rendezvous until all have arrived, hence one ray.get for all."""
        ep = ray.get(self.learner.weight_broadcast_endpoint.remote())
        world_size = 1 + len(self.workers)
        ray.get([self.learner.join_weight_broadcast.remote(ep["master_address"], ep["master_port"], ep["backend"],
                                                           world_size, bucket_bytes)]
                + [w.join_weight_broadcast.remote(ep["master_address"], ep["master_port"], i + 1, world_size,
                                                  ep["backend"], bucket_bytes)
                   for i, w in enumerate(self.workers)])
        # The set of tensors never changes during a run: the receivers' bucket plans are fixed.
        self.metas = ray.get(self.learner.weight_metas.remote())

    def transfer(self, version: int, wait: bool = True) -> dict[str, float]:
        """Send the current weights as `version`; sync/* metrics (seconds, bytes, GB/s, send and
        load parts).

        wait=False (rollouts still in flight on the engines, max_staleness > 0): the loads are
        queued behind those rollouts and not waited for; `finish()` collects them later. The
        broadcast transport cannot defer (the learner's send is a collective with the engines):
        it waits either way, and the learner idles until the engines are free.
        """
        t0 = time.perf_counter()
        if self.method == "broadcast":
            receives = [w.receive_weight_broadcast.remote(self.metas, version) for w in self.workers]
            gathers = [h.broadcast_weights.remote() for h in self.gathering_ranks]
            sent, *loads = _get_failing_fast([self.learner.broadcast_weights.remote()] + receives + gathers)
            loads = loads[:len(receives)]
            t_export = sent["seconds"]
        else:
            loads = self._object_store(range(len(self.workers)), version, wait)
            if loads is None:
                return {"sync/export_seconds": self._t_export, "sync/deferred": 1.0}
            t_export = self._t_export
        seconds = time.perf_counter() - t0
        return {**_load_metrics(loads, seconds), "sync/export_seconds": t_export, "sync/deferred": 0.0}

    def transfer_to(self, index: int, version: int) -> dict[str, float]:
        """A full sync of one engine (a replacement for a lost one): the current weights as
        `version`, waited for. The broadcast's process group was formed with the engines of
        the start and cannot take a new member, so that transport cannot replace one."""
        if self.method == "broadcast":
            raise SyncError("rollout.weight_sync = broadcast: the weight broadcast's process group cannot take a "
                            "replacement engine for a lost one. Resume the run (it forms a new group), or use "
                            "rollout.weight_sync: object_store, which replaces lost engines in place.")
        t0 = time.perf_counter()
        loads = self._object_store([index], version, wait=True)
        return _load_metrics(loads, time.perf_counter() - t0)

    def _object_store(self, indices, version: int, wait: bool) -> list[dict] | None:
        """Export once into the object store, load into engines `indices`; the loads' results,
        or None when deferred (wait=False)."""
        t0 = time.perf_counter()
        weights = self.learner.export_flat_weights.remote()
        gathers = [h.export_flat_weights.remote() for h in self.gathering_ranks]
        supervised_get([Watched("learner", 0, self.learner, weights, "export_flat_weights")], self.timeout_s,
                       fetch=False)
        self._t_export = time.perf_counter() - t0
        loads = [Watched("rollout", i, self.workers[i], self.workers[i].load_weights.remote(weights, version),
                         "load_weights")
                 for i in indices]
        supervised_get([Watched("learner", r + 1, h, ref, "export_flat_weights")
                        for r, (h, ref) in enumerate(zip(self.gathering_ranks, gathers))], self.timeout_s, fetch=False)
        del weights
        if not wait:
            self.deferred.append((loads, t0))
            return None
        return supervised_get(loads, self.timeout_s)

    def finish(self) -> dict[str, float]:
        """Wait for the deferred loads (raises what a failed load raised); the sync/* metrics
        of the last one (its seconds count from the send to the end of the engines' load,
        the wait behind the rollouts in flight included)."""
        metrics: dict[str, float] = {}
        while self.deferred:
            loads, t0 = self.deferred[0]
            # still the engines they were sent to: a replaced engine had a full sync instead
            loads = [c for c in loads if c.actor is self.workers[c.index]]
            results = supervised_get(loads, self.timeout_s)  # ActorLost leaves them queued
            self.deferred.pop(0)
            if results:
                metrics = _load_metrics(results, time.perf_counter() - t0)
        return metrics


def _load_metrics(loads: list[dict], seconds: float) -> dict[str, float]:
    nbytes = loads[0]["bytes"]
    return {"sync/seconds": seconds, "sync/bytes": nbytes, "sync/load_seconds": max(x["seconds"] for x in loads),
            "sync/gb_per_s": nbytes / max(seconds, 1e-9) / 1e9}


def _get_failing_fast(refs: list) -> list:
    """ray.get(refs), but the first failure raises at once: when one member of the broadcast
    dies, the others wait in the collective until its timeout (minutes), so waiting for all of
    them in order would hide the cause that long."""
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        try:
            ray.get(done)
        except Exception as e:
            raise SyncError(f"Weight broadcast failed ({type(e).__name__}): {str(e).strip()[-2000:]}\n"
                            "The learner and the rollout engines form one process group; the other "
                            "members stay blocked in the broadcast until its timeout. Restart the run "
                            "(trainer.resume_from the last checkpoint).") from e
    return ray.get(refs)
