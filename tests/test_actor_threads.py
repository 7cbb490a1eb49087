"""Threads inside the actors: Ray starts actors that reserve no CPU with OMP_NUM_THREADS=1,
which the OpenMP runtime reads when torch is imported, before any constructor runs. The rollout
worker must still decode on every core (1.4x faster on this 2-core machine, docs/BENCHMARKS.md),
and placement.json reports what each actor runs with."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.slow


def test_rollout_and_learner_actors_use_every_core(tiny_model_dir):
    import ray

    from rl.actors import LearnerActor, RolloutActor
    from rl.config import Config

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        c = Config()
        c.rollout.gpu_memory_utilization = 0.05
        rollout = RolloutActor.options(num_cpus=0).remote(tiny_model_dir, c.rollout, dtype="float32",
                                                          max_model_len=256, seed=0)
        model = c.model
        model.path, model.dtype = tiny_model_dir, "float32"
        learner = LearnerActor.options(num_cpus=0).remote(model, c.learner, c.objective)
        where = ray.get([rollout.where.remote(), learner.where.remote()])
        assert [w["torch_threads"] for w in where] == [os.cpu_count()] * 2, where
        assert all(w["pid"] > 0 and w["pid"] != os.getpid() for w in where)
    finally:
        ray.shutdown()
