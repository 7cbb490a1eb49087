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
        # the rollout log-probs here are placeholders (-1.0), not a behavior policy: no correction
        settings = ["model.dtype=float32", "learner.lr=1e-2", "learner.micro_batch_tokens=40",
                    "objective.name=grpo", "objective.loss_agg_mode=seq-mean-token-mean",
                    "learner.behavior_correction.mode=none"]
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
                        "learner.layout=padded", "objective.name=grpo", "objective.loss_agg_mode=seq-mean-token-mean",
                        "learner.behavior_correction.mode=none"]  # placeholder rollout log-probs
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


def test_two_ranks_equal_one_rank_with_mini_batches_and_epochs(tiny_model_dir):
    """learner.mini_batches=2, ppo_epochs=2, truncated behavior correction: the driver's shards
    (rl.batches.make_train_shards) on two ranks take the same four optimizer steps as one rank.
    A tiny learning rate keeps AdamW's sign-like first steps from amplifying float rounding
    between the two splits into the later mini-batches' gradients."""
    import ray

    from rl.actors import LearnerGroup
    from rl.batches import ScoredBatch, ScoredGroup, make_train_shards
    from rl.config import load_config
    from rollout.records import Sample

    rng = random.Random(7)
    groups = []
    for g in range(4):
        prompt = [rng.randint(3, 400) for _ in range(rng.randint(4, 10))]
        samples = []
        for k in range(3):
            response = [rng.randint(3, 400) for _ in range(rng.randint(2, 10))]
            # near the random tiny model's log(1/512) = -6.24, so the weights straddle the cap
            samples.append(Sample(g, k, prompt, response, "", [rng.uniform(-6.6, -5.9) for _ in response], "stop"))
        groups.append(ScoredGroup(samples, [float(k % 2) for k in range(3)], [True] * 3))
    batch = ScoredBatch(groups, {}, [])
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        settings = ["model.dtype=float32", "learner.lr=1e-6", "learner.micro_batch_tokens=40", "objective.name=grpo",
                    "learner.mini_batches=2", "learner.ppo_epochs=2", "learner.behavior_correction.cap=1.2"]
        results = {}
        for world in (1, 2):
            config = load_config(None, [*settings, f"learner.workers={world}"])
            group = LearnerGroup(config, tiny_model_dir)
            shards, _ = make_train_shards(config.objective.build(), batch, world, 16, mini_batches=2)
            metrics, _ = group.update(shards)
            state = ray.get(group.rank0.__ray_call__.remote(
                lambda self: ({n: p.grad.clone() for n, p in self.policy.net.named_parameters()},
                              self.updater.history)))
            results[world] = (metrics, *state)
            group.shutdown()
        (m1, g1, h1), (m2, g2, h2) = results[1], results[2]
        assert m1["actor/optimizer_steps"] == m2["actor/optimizer_steps"] == 4.0
        for a, b in zip(h1, h2):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
            assert a["clip_fraction"] == pytest.approx(b["clip_fraction"], abs=1e-9)
            assert a["ratio_max"] == pytest.approx(b["ratio_max"], rel=1e-5)
        for key in ("loss", "grad_norm", "behavior/ess_fraction", "behavior/mismatch_kl", "behavior/weight_max",
                    "behavior/over_cap_fraction", "actor/approx_kl", "train/tokens"):
            assert m1[key] == pytest.approx(m2[key], rel=1e-5, abs=1e-7), key
        assert 0 < m1["behavior/over_cap_fraction"] < 1  # the cap was active on some tokens
        scale = max(float(g.abs().max()) for g in g1.values())
        assert scale > 1e-3
        assert max(float((g1[k] - g2[k]).abs().max()) for k in g1) < 1e-5 * max(scale, 1)
    finally:
        ray.shutdown()


def test_fsdp_mini_batches_with_a_rank_empty_in_one_of_them(tiny_model_dir):
    """fsdp, mini_batches=2, ppo_epochs=2: the proximal forward and every optimizer step pair up
    their collectives even when rank 1 holds no sequence of mini-batch 0 (8 / 2 split), and the
    four steps match one unsharded learner's."""
    import ray

    from rl.actors import LearnerGroup
    from rl.config import load_config
    from rl.fsdp import full_tensor
    from rl.learner import TrainBatch

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        prompts, responses, adv, _ = _batch(seed=3)
        lps = [[-6.2] * len(r) for r in responses]  # near the tiny model's log(1/512)
        which = [0] * 5 + [1] * 5
        norms = [(float(sum(len(responses[i]) for i in range(10) if which[i] == m)), 5.0, 15.0) for m in (0, 1)]
        n_tok = sum(len(r) for r in responses)
        results = {}
        for strategy, world, split in (("replicate", 1, [list(range(10))]),
                                       ("fsdp", 2, [list(range(8)), [8, 9]])):
            settings = ["model.dtype=float32", "learner.lr=1e-6", "learner.micro_batch_tokens=40",
                        "learner.layout=padded", "objective.name=grpo", "learner.mini_batches=2",
                        "learner.ppo_epochs=2"]
            group = LearnerGroup(load_config(None, [*settings, f"learner.workers={world}",
                                                    f"learner.strategy={strategy}"]), tiny_model_dir)
            shards = [TrainBatch([prompts[i] for i in idx], [responses[i] for i in idx], [adv[i] for i in idx],
                                 [lps[i] for i in idx], n_tok, len(responses), 15,
                                 mini_batch=[which[i] for i in idx], mini_batch_norms=norms) for idx in split]
            metrics, _ = group.update(shards)
            # full gradients: under fsdp each rank gathers its peers' shards (all ranks call)
            state = ray.get([w.__ray_call__.remote(lambda self: (
                {n: full_tensor(p.grad).clone() for n, p in self.policy.net.named_parameters()},
                self.updater.history)) for w in group.workers])
            results[strategy] = (metrics, *state[0])
            group.shutdown()
        (m1, g1, h1), (m2, g2, h2) = results["replicate"], results["fsdp"]
        assert len(h1) == len(h2) == 4
        for a, b in zip(h1, h2):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert m1["behavior/ess_fraction"] == pytest.approx(m2["behavior/ess_fraction"], rel=1e-6)
        scale = max(float(g.abs().max()) for g in g1.values())
        assert scale > 1e-3
        assert max(float((g1[k] - g2[k]).abs().max()) for k in g1) < 1e-5 * max(scale, 1)
    finally:
        ray.shutdown()
