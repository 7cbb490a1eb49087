"""PPO epochs and mini-batches (`learner.ppo_epochs`, `learner.mini_batches`): the driver's
split into mini-batches of whole groups, and the real PolicyUpdate on the tiny model."""

import math
import random

import pytest
import torch

from rl.batches import ScoredBatch, ScoredGroup, make_train_shards, split_mini_batches
from rl.objectives import OBJECTIVES, get_objective
from rl.packing import split_across_ranks
from rollout.records import Sample


def _scored_batch(num_groups, group_size, seed=0, vocab=400, logprobs=None):
    """Random prompts and responses; rewards 0/1 with both values in every group (non-zero
    GRPO advantages); behavior log-probs from `logprobs(prompt, response)` or -1.0."""
    rng = random.Random(seed)
    groups = []
    for g in range(num_groups):
        prompt = [rng.randint(3, vocab) for _ in range(rng.randint(4, 10))]
        samples = []
        for k in range(group_size):
            response = [rng.randint(3, vocab) for _ in range(rng.randint(2, 9))]
            lps = logprobs(prompt, response) if logprobs else [-1.0] * len(response)
            samples.append(Sample(10 + 3 * g, k, prompt, response, "", lps, "stop"))
        rewards = [float(k % 2) for k in range(group_size)]
        groups.append(ScoredGroup(samples, rewards, [True] * group_size))
    return ScoredBatch(groups, {}, [])


# --- the driver: mini-batches of whole groups, per-mini-batch global counts ----------------

def test_split_mini_batches_keeps_groups_and_balances_counts():
    # 4 distinct groups in order of appearance 5, 3, 9, 1; 3 mini-batches -> group counts 2, 1, 1
    ids = [5, 5, 3, 3, 9, 9, 1]
    assert split_mini_batches(ids, 3) == [0, 0, 0, 0, 1, 1, 2]
    assert split_mini_batches(ids, 1) == [0] * 7
    assert split_mini_batches(ids, 4) == [0, 0, 1, 1, 2, 2, 3]
    with pytest.raises(ValueError, match="mini_batches = 5 is larger than the batch.*4 prompt group"):
        split_mini_batches(ids, 5)


def test_make_train_shards_mini_batches_and_global_norms():
    obj = get_objective("grpo")
    batch = _scored_batch(num_groups=5, group_size=3, seed=1)
    shards, _ = make_train_shards(obj, batch, num_ranks=2, max_response_len=16, mini_batches=2)
    samples = batch.samples
    # 5 groups into 2 mini-batches: the first 3 groups, then the last 2
    expected_mb = {s.group_id: (0 if s.group_id < 10 + 3 * 3 else 1) for s in samples}
    assert all(len(s.mini_batch_norms) == 2 for s in shards)
    assert shards[0].mini_batch_norms == shards[1].mini_batch_norms  # same list on every rank
    seen = []
    for shard in shards:
        for p, r, m in zip(shard.prompt_ids, shard.response_ids, shard.mini_batch):
            sample = next(s for s in samples if s.prompt_ids == p and s.response_ids == r)
            assert m == expected_mb[sample.group_id]
            seen.append(sample.group_id)
    assert sorted(seen) == sorted(s.group_id for s in samples)  # every sample once
    for g in set(seen):  # a group lives on one rank
        assert sum(any(s.group_id == g and s.prompt_ids == p for p in sh.prompt_ids for s in samples)
                   for sh in shards) == 1
    # each mini-batch's LossNorm counts ITS sequences over both ranks: tokens, sequences, C = 16
    for m in range(2):
        lens = [len(s.response_ids) for s in samples if expected_mb[s.group_id] == m]
        assert shards[0].mini_batch_norms[m] == (float(sum(lens)), float(len(lens)), 16.0)
    # the whole batch's counts stay in num_tokens / num_seqs
    assert shards[0].num_tokens == float(sum(len(s.response_ids) for s in samples))


def test_one_mini_batch_gives_the_former_shards():
    obj = get_objective("grpo")
    batch = _scored_batch(num_groups=4, group_size=3, seed=2)
    shards, _ = make_train_shards(obj, batch, num_ranks=2, max_response_len=16)
    samples = batch.samples
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    former = split_across_ranks(lengths, 2, [s.group_id for s in samples])
    for shard, idx in zip(shards, former):
        assert shard.response_ids == [samples[i].response_ids for i in idx]
        assert shard.mini_batch == [0] * len(idx)
        assert shard.mini_batch_norms == [(shard.num_tokens, shard.num_seqs, shard.max_len)]


def test_mini_batches_larger_than_batch_is_a_clear_error():
    batch = _scored_batch(num_groups=2, group_size=2)
    with pytest.raises(ValueError, match="learner.mini_batches = 3 is larger than the batch"):
        make_train_shards(get_objective("grpo"), batch, 1, 16, mini_batches=3)


def test_learner_refuses_more_mini_batches_than_configured(tiny_model_dir, make_learner):
    learner = make_learner(tiny_model_dir, "model.dtype=float32", "learner.mini_batches=1")
    shards, _ = make_train_shards(learner.objective, _scored_batch(2, 2), 1, 16, mini_batches=2)
    with pytest.raises(ValueError, match="2 mini-batch.*learner.mini_batches = 1"):
        learner.update(shards[0])


def test_learner_takes_fewer_mini_batches_when_groups_were_dropped(tiny_model_dir, make_learner):
    # learner.mini_batches = 2, but only one group is left this step: the driver splits it into
    # one mini-batch, and the learner takes one optimizer step per epoch instead of failing.
    learner = make_learner(tiny_model_dir, "model.dtype=float32", "learner.mini_batches=2",
                           "learner.behavior_correction.mode=none")
    shards, _ = make_train_shards(learner.objective, _scored_batch(1, 2), 1, 16, mini_batches=1)
    metrics, _ = learner.update(shards[0])
    assert metrics["actor/optimizer_steps"] == 1


# --- the learner: real PolicyUpdate on the tiny model --------------------------------------

def _behavior_logprobs(learner, noise, seed=0):
    """A behavior policy near the learner's: its own log-probs plus Gaussian noise per token."""
    gen = torch.Generator().manual_seed(seed)

    def score(prompt, response):
        lp = torch.tensor(learner.score(prompt, response))
        return (lp + noise * torch.randn(lp.shape, generator=gen)).tolist()

    return score


def _weights(learner):
    return {n: p.detach().clone() for n, p in learner.policy.net.named_parameters()}


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_every_objective_two_epochs_two_mini_batches(tiny_model_dir, make_learner, name):
    learner = make_learner(tiny_model_dir, "model.dtype=float32", "learner.lr=1e-3", "learner.micro_batch_tokens=64",
                           "learner.ppo_epochs=2", "learner.mini_batches=2", f"objective.name={name}")
    batch = _scored_batch(num_groups=3, group_size=2, seed=3, logprobs=_behavior_logprobs(learner, 0.05))
    shards, _ = make_train_shards(learner.objective, batch, 1, 16, mini_batches=2)
    before = _weights(learner)
    metrics, _ = learner.update(shards[0])
    after = _weights(learner)
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0
    assert max(float((after[k] - before[k]).abs().max()) for k in before) > 1e-5  # the weights moved
    assert metrics["actor/optimizer_steps"] == 4.0  # 2 epochs x 2 mini-batches
    assert [(h["epoch"], h["mini_batch"]) for h in learner.updater.history] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for key in ("clip_ratio", "clip_ratio/high", "clip_ratio/low", "actor/clip_fraction", "actor/approx_kl",
                "actor/ratio_max", "behavior/ess_fraction", "behavior/mismatch_kl", "behavior/weight_max",
                "entropy", "lr", "train/tokens"):
        assert key in metrics and math.isfinite(metrics[key]), key
    assert metrics["actor/clip_fraction"] == metrics["clip_ratio"]
    assert 0 < metrics["behavior/ess_fraction"] <= 1
    assert metrics["behavior/mismatch_kl"] > 0  # the behavior log-probs were perturbed
    # the first optimizer step trains the proximal policy itself: ratio 1, nothing clipped
    assert learner.updater.history[0]["ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert learner.updater.history[0]["clip_fraction"] == 0.0
    assert metrics["actor/ratio_max"] > 1.0  # later passes moved away from it


def test_second_epoch_clips_and_metrics_average_the_passes(tiny_model_dir, make_learner):
    # A large step so that the second pass over the same batch leaves the 0.8 .. 1.2 trust region.
    learner = make_learner(tiny_model_dir, "model.dtype=float32", "learner.lr=2e-2", "learner.ppo_epochs=2",
                           "objective.name=grpo", "learner.behavior_correction.mode=none")
    batch = _scored_batch(num_groups=3, group_size=4, seed=4, logprobs=_behavior_logprobs(learner, 0.0))
    shards, _ = make_train_shards(learner.objective, batch, 1, 16)
    metrics, _ = learner.update(shards[0])
    first, second = learner.updater.history
    assert first["clip_fraction"] == 0.0 and first["ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert second["clip_fraction"] > 0.0
    assert second["ratio_max"] > 1.2
    # every epoch sees each token once: the step's clip fraction is the mean of the two passes,
    # loss and grad_norm the means over the optimizer steps
    assert metrics["actor/clip_fraction"] == pytest.approx((first["clip_fraction"] + second["clip_fraction"]) / 2)
    assert metrics["loss"] == pytest.approx((first["loss"] + second["loss"]) / 2)
    assert metrics["grad_norm"] == pytest.approx((first["grad_norm"] + second["grad_norm"]) / 2)
    assert metrics["actor/ratio_max"] == second["ratio_max"]
    assert metrics["actor/approx_kl"] > 0


def test_proximal_forward_only_when_the_batch_is_reused(tiny_model_dir, make_learner, monkeypatch):
    calls = []
    for epochs, mini_batches, mode, expected in ((1, 1, "none", 0), (1, 1, "truncate", 0), (2, 1, "none", 1),
                                                 (1, 2, "truncate", 1)):
        learner = make_learner(tiny_model_dir, "model.dtype=float32", f"learner.ppo_epochs={epochs}",
                               f"learner.mini_batches={mini_batches}", f"learner.behavior_correction.mode={mode}")
        original = learner.updater.proximal_logprobs
        calls.clear()
        monkeypatch.setattr(learner.updater, "proximal_logprobs",
                            lambda *a, original=original: calls.append(1) or original(*a))
        shards, _ = make_train_shards(learner.objective, _scored_batch(2, 2, seed=5), 1, 16,
                                      mini_batches=mini_batches)
        metrics, _ = learner.update(shards[0])
        assert len(calls) == expected, (epochs, mini_batches, mode)
        assert metrics["actor/optimizer_steps"] == epochs * mini_batches


def test_hapo_batch_stats_once_per_step(tiny_model_dir, make_learner, monkeypatch):
    learner = make_learner(tiny_model_dir, "model.dtype=float32", "learner.ppo_epochs=2", "learner.mini_batches=2",
                           "objective.name=hapo")
    calls = []
    original = learner.updater.global_batch_stats
    monkeypatch.setattr(learner.updater, "global_batch_stats", lambda b: calls.append(1) or original(b))
    shards, _ = make_train_shards(learner.objective, _scored_batch(2, 2, seed=6), 1, 16, mini_batches=2)
    _, stats = learner.update(shards[0])
    assert len(calls) == 1 and stats is not None
