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


class WeightSync:
    """Learner rank 0 -> rollout engines; `transfer()` once per step."""

    def __init__(self, method: str, learners: list, rollout_workers: list, bucket_bytes: int):
        """learners: [rank 0] when it holds the whole model; every rank, rank 0 first, when the
        model is sharded (fsdp): they all take part in gathering the weights, rank 0 sends."""
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
            weights = self.learner.export_flat_weights.remote()
            gathers = [h.export_flat_weights.remote() for h in self.gathering_ranks]
            ray.wait([weights], fetch_local=False)
            t_export = time.perf_counter() - t0
            load_refs = [w.load_weights.remote(weights, version) for w in self.workers]
            ray.get(gathers)
            del weights
            if not wait:
                self.deferred.append((load_refs, t0))
                return {"sync/export_seconds": t_export, "sync/deferred": 1.0}
            loads = ray.get(load_refs)
        seconds = time.perf_counter() - t0
        return {**_load_metrics(loads, seconds), "sync/export_seconds": t_export, "sync/deferred": 0.0}

    def finish(self) -> dict[str, float]:
        """Wait for the deferred loads (raises what a failed load raised); the sync/* metrics
        of the last one (its seconds count from the send to the end of the engines' load,
        the wait behind the rollouts in flight included)."""
        metrics: dict[str, float] = {}
        while self.deferred:
            load_refs, t0 = self.deferred.pop(0)
            metrics = _load_metrics(ray.get(load_refs), time.perf_counter() - t0)
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
