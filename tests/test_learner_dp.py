"""Data-parallel learners (Ray actors, gloo) take the same step as one learner on the whole batch."""

import random

import pytest
import torch

pytestmark = pytest.mark.slow


def _batch(seed=0, n=10):
    from rl.learner import TrainBatch

    rng = random.Random(seed)
    prompts = [[rng.randint(3, 400) for _ in range(rng.randint(4, 12))] for _ in range(n)]
    responses = [[rng.randint(3, 400) for _ in range(rng.randint(1, 15))] for _ in range(n)]
    adv = [[rng.uniform(-1, 1)] * len(r) for r in responses]
    lps = [[-1.0] * len(r) for r in responses]
    return prompts, responses, adv, lps


def test_two_ranks_equal_one_rank(tiny_model_dir):
    import ray

    from rl.actors import LearnerGroup
    from rl.config import load_config
    from rl.learner import LearnerSettings, TrainBatch
    from rl.packing import split_across_ranks

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        prompts, responses, adv, lps = _batch()
        n_tok = sum(len(r) for r in responses)
        # token budget small enough that each rank also splits its share into micro-batches
        settings = LearnerSettings(model_path=tiny_model_dir, dtype="float32", lr=1e-2, micro_batch_tokens=40,
                                   objective="grpo", objective_params={"loss_agg_mode": "seq-mean-token-mean"})
        grads_by_world = {}
        for world in (1, 2):
            group = LearnerGroup(load_config(None, [f"learner.workers={world}"]), settings)
            lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
            shards = [TrainBatch([prompts[i] for i in idx], [responses[i] for i in idx], [adv[i] for i in idx],
                                 [lps[i] for i in idx], n_tok, len(responses), 15)
                      for idx in split_across_ranks(lengths, world)]
            metrics = group.update(shards)
            # The gradient each rank ended with (summed over ranks, before AdamW's step): the
            # weights after AdamW's first step would amplify float rounding of tiny gradients.
            grads = ray.get(group.rank0.__ray_call__.remote(
                lambda self: {n: p.grad.clone() for n, p in self.model.named_parameters()}))
            grads_by_world[world] = (grads, metrics)
            group.shutdown()
        (w1, m1), (w2, m2) = grads_by_world[1], grads_by_world[2]
        assert m1["loss"] == pytest.approx(m2["loss"], abs=1e-6)
        assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-5)
        scale = max(float(g.abs().max()) for g in w1.values())
        worst = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
        assert scale > 1e-3                 # there is a gradient
        assert worst < 1e-6 * max(scale, 1)  # and both splits produced the same one
    finally:
        ray.shutdown()
