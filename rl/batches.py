"""A step's samples as scored groups, and the learners' shards built from them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rl.learner.batch import TrainBatch
from rl.objectives import Objective
from rl.packing import split_across_ranks
from rollout.records import Sample


@dataclass
class ScoredGroup:
    """The G samples of one prompt with their rewards."""

    samples: list[Sample]
    """Sorted by sample_index; one group_id, unique across the step's generation batches."""
    rewards: list[float]
    """[G] reward after objective shaping (DAPO overlong penalty)."""
    valid: list[bool]
    """[G] False: dropped by reward.on_error."""

    def valid_rewards(self) -> list[float]:
        return [r for r, v in zip(self.rewards, self.valid) if v]


@dataclass
class ScoredBatch:
    """One step's training material and what it cost to make."""

    groups: list[ScoredGroup]
    metrics: dict
    """Rollout, reward, dynamic-sampling and logits-processor metrics over every sample drawn."""
    failures: list[str]
    """Reward failures, one line each."""

    @property
    def samples(self) -> list[Sample]:
        return [s for g in self.groups for s in g.samples]

    @property
    def rewards(self) -> list[float]:
        return [r for g in self.groups for r in g.rewards]

    @property
    def valid(self) -> list[bool]:
        return [v for g in self.groups for v in g.valid]


def split_groups(samples: list[Sample], rewards: list[float], valid: list[bool]) -> list[ScoredGroup]:
    """Samples sorted by group -> one ScoredGroup per group, in group order."""
    groups: dict[int, ScoredGroup] = {}
    for s, r, v in zip(samples, rewards, valid):
        g = groups.setdefault(s.group_id, ScoredGroup([], [], []))
        g.samples.append(s)
        g.rewards.append(r)
        g.valid.append(v)
    return [groups[k] for k in sorted(groups)]


def make_train_shards(objective: Objective, batch: ScoredBatch, num_ranks: int,
                      max_response_len: int) -> tuple[list[TrainBatch], dict[str, float]]:
    """Advantages over the whole batch (groups intact), then one shard per learner rank, each
    GRPO group on one rank (so a shared prompt runs once in all)."""
    keep = [i for i, (s, v) in enumerate(zip(batch.samples, batch.valid)) if v and s.response_ids]
    samples = [batch.samples[i] for i in keep]
    rewards = torch.tensor([batch.rewards[i] for i in keep], dtype=torch.float32)
    group = torch.tensor([s.group_id for s in samples], dtype=torch.long)
    T = max(len(s.response_ids) for s in samples)
    mask = torch.zeros(len(samples), T, dtype=torch.bool)
    logp = torch.zeros(len(samples), T)
    for i, s in enumerate(samples):
        mask[i, :len(s.response_ids)] = True
        logp[i, :len(s.logprobs)] = torch.tensor(s.logprobs)
    adv = objective.advantages(rewards, group, mask, logp=logp)  # [N, T]
    norm = objective.loss_norm(mask, max_len=max_response_len)
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    shards = []
    for idx in split_across_ranks(lengths, num_ranks, [s.group_id for s in samples]):
        shards.append(TrainBatch(
            prompt_ids=[samples[i].prompt_ids for i in idx],
            response_ids=[samples[i].response_ids for i in idx],
            advantages=[adv[i, :len(samples[i].response_ids)].tolist() for i in idx],
            rollout_logprobs=[samples[i].logprobs for i in idx],
            num_tokens=norm.num_tokens, num_seqs=norm.num_seqs, max_len=norm.max_len))
    valid_adv = adv[mask]
    metrics = {"adv/mean": float(valid_adv.mean()),
               "adv/std": float(valid_adv.std()) if valid_adv.numel() > 1 else 0.0,
               "train/sequences": float(len(samples)),
               "train/dropped_sequences": float(len(batch.samples) - len(samples)),
               **objective.advantage_metrics()}
    return shards, metrics
