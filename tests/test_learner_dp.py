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
    from rl.learner import TrainBatch
    from rl.packing import split_across_ranks

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        prompts, responses, adv, lps = _batch()
        n_tok = sum(len(r) for r in responses)
        # token budget small enough that each rank also splits its share into micro-batches
        settings = ["model.dtype=float32", "learner.lr=1e-2", "learner.micro_batch_tokens=40",
                    "objective.name=grpo", "objective.loss_agg_mode=seq-mean-token-mean"]
        grads_by_world = {}
        for world in (1, 2):
            group = LearnerGroup(load_config(None, [*settings, f"learner.workers={world}"]), tiny_model_dir)
            lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
            shards = [TrainBatch([prompts[i] for i in idx], [responses[i] for i in idx], [adv[i] for i in idx],
                                 [lps[i] for i in idx], n_tok, len(responses), 15)
                      for idx in split_across_ranks(lengths, world)]
            metrics, _ = group.update(shards)
            # The gradient each rank ended with (summed over ranks, before AdamW's step): the
            # weights after AdamW's first step would amplify float rounding of tiny gradients.
            grads = ray.get(group.rank0.__ray_call__.remote(
                lambda self: {n: p.grad.clone() for n, p in self.policy.net.named_parameters()}))
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


def test_fsdp_two_ranks_equal_one_rank_with_unequal_micro_batch_counts(tiny_model_dir):
    """learner.strategy=fsdp (FSDP2 over gloo): weights, gradients and AdamW state sharded. Rank 0
    gets 8 sequences, rank 1 two, so rank 1 pads with zero-gradient passes to keep the
    collectives paired. The summed gradient equals one unsharded learner's on the whole batch,
    and the gathered weights after the step equal its weights."""
    import ray

    from rl.actors import LearnerGroup
    from rl.config import load_config
    from rl.fsdp import full_tensor
    from rl.learner import TrainBatch

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        prompts, responses, adv, lps = _batch(seed=3)
        n_tok = sum(len(r) for r in responses)
        results = {}
        for strategy, world, split in (("replicate", 1, [list(range(10))]),
                                       ("fsdp", 2, [list(range(8)), [8, 9]])):
            settings = ["model.dtype=float32", "learner.lr=1e-3", "learner.micro_batch_tokens=40",
                        "learner.layout=padded", "objective.name=grpo", "objective.loss_agg_mode=seq-mean-token-mean"]
            group = LearnerGroup(load_config(None, [*settings, f"learner.workers={world}",
                                                    f"learner.strategy={strategy}"]), tiny_model_dir)
            shards = [TrainBatch([prompts[i] for i in idx], [responses[i] for i in idx], [adv[i] for i in idx],
                                 [lps[i] for i in idx], n_tok, len(responses), 15) for idx in split]
            metrics, _ = group.update(shards)
            # Full gradients and weights: under fsdp each rank gathers its peers' shards (all call).
            state = ray.get([w.__ray_call__.remote(lambda self, shard: (
                {n: full_tensor(p.grad).clone() for n, p in self.policy.net.named_parameters()},
                {n: full_tensor(p.detach()).clone() for n, p in self.policy.net.named_parameters()},
                type(next(self.policy.net.parameters())).__name__,
                len(self.updater.micro_batches.plan(shard.prompt_ids, shard.response_ids))), shard)
                for w, shard in zip(group.workers, shards)])
            results[strategy] = (metrics, state)
            group.shutdown()
        (m1, [(g1, w1, kind1, _)]), (m2, fsdp_state) = results["replicate"], results["fsdp"]
        g2, w2, kind2, _ = fsdp_state[0]
        assert kind1 == "Parameter" and kind2 == "DTensor"  # it really was sharded
        assert [s[3] for s in fsdp_state][0] > [s[3] for s in fsdp_state][1]  # unequal micro-batch counts
        assert m1["loss"] == pytest.approx(m2["loss"], abs=1e-6)
        scale = max(float(g.abs().max()) for g in g1.values())
        assert scale > 1e-3
        assert max(float((g1[k] - g2[k]).abs().max()) for k in g1) < 1e-6 * max(scale, 1)
        assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-5)
        moved = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
        assert moved < 1e-5  # same AdamW step applied shard by shard
    finally:
        ray.shutdown()
