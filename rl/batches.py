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


def split_mini_batches(group_ids: list, mini_batches: int) -> list[int]:
    """Mini-batch index [N] of each sequence from its group id [N]: the distinct groups, in
    order of first appearance, cut into `mini_batches` contiguous runs whose group counts differ
    by at most one (the first runs take the extra groups). A group's sequences share a
    mini-batch. ValueError when there are fewer groups than mini-batches."""
    order: dict = {}
    for g in group_ids:
        order.setdefault(g, len(order))
    k = len(order)
    if mini_batches < 1:
        raise ValueError(f"mini_batches = {mini_batches} must be >= 1")
    if mini_batches > k:
        raise ValueError(f"learner.mini_batches = {mini_batches} is larger than the batch: this step trains "
                         f"{k} prompt group(s), and a mini-batch holds whole groups. Lower learner.mini_batches "
                         "to at most the groups trained per step (data.prompts_per_step, fewer when reward "
                         "failures drop whole groups).")
    base, extra = divmod(k, mini_batches)
    bounds, start = [], 0
    for m in range(mini_batches):
        start += base + (1 if m < extra else 0)
        bounds.append(start)
    of_group = {}
    for g, j in order.items():
        of_group[g] = next(m for m, b in enumerate(bounds) if j < b)
    return [of_group[g] for g in group_ids]


def make_train_shards(objective: Objective, batch: ScoredBatch, num_ranks: int,
                      max_response_len: int, mini_batches: int = 1) -> tuple[list[TrainBatch], dict[str, float]]:
    """Advantages over the whole batch (groups intact), then one shard per learner rank.

    The groups are split into `mini_batches` mini-batches (`split_mini_batches`; pass
    `learner.mini_batches`), each mini-batch's LossNorm is computed from ITS rows of the global
    mask, and each mini-batch is shared among the ranks with every GRPO group on one rank (so a
    shared prompt runs once in all). Every shard names all mini-batches (`TrainBatch.mini_batch`,
    `mini_batch_norms`), even one it holds no sequence of, so the ranks take their optimizer
    steps together. With one mini-batch the shards are the former ones.
    """
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
    group_ids = [s.group_id for s in samples]
    which = split_mini_batches(group_ids, mini_batches)
    per_rank: list[list[int]] = [[] for _ in range(num_ranks)]
    norms = []
    for m in range(mini_batches):
        rows = [i for i in range(len(samples)) if which[i] == m]
        mb_norm = objective.loss_norm(mask[rows], max_len=max_response_len)
        norms.append((mb_norm.num_tokens, mb_norm.num_seqs, mb_norm.max_len))
        for r, idx in enumerate(split_across_ranks([lengths[i] for i in rows], num_ranks,
                                                   [group_ids[i] for i in rows])):
            per_rank[r].extend(rows[j] for j in idx)
    shards = []
    for idx in per_rank:
        shards.append(TrainBatch(
            prompt_ids=[samples[i].prompt_ids for i in idx],
            response_ids=[samples[i].response_ids for i in idx],
            advantages=[adv[i, :len(samples[i].response_ids)].tolist() for i in idx],
            rollout_logprobs=[samples[i].logprobs for i in idx],
            num_tokens=norm.num_tokens, num_seqs=norm.num_seqs, max_len=norm.max_len,
            mini_batch=[which[i] for i in idx], mini_batch_norms=list(norms)))
    valid_adv = adv[mask]
    metrics = {"adv/mean": float(valid_adv.mean()),
               "adv/std": float(valid_adv.std()) if valid_adv.numel() > 1 else 0.0,
               "train/sequences": float(len(samples)),
               "train/dropped_sequences": float(len(batch.samples) - len(samples)),
               **objective.advantage_metrics()}
    return shards, metrics
