"""FGO: Fine-grained Group Policy Optimization (CoT compression; cited by title, arXiv id not
verified here).

Reward reshaping inside each group, then a Dr. GRPO-style advantage:
    base r_i = +1 if correct (reward > threshold) else -1
    L_i = valid tokens,  H_i = -sum_t exp(lp[i,t]) * lp[i,t] over the sampled tokens (rollout
    log-probs, as the reference code does: a cheap sequence-level entropy proxy)
    correct subgroup G+:   raw_i = (mean(L+)/L_i)^alpha * (mean(H+)/H_i)^beta
    incorrect subgroup G-: raw_i = (L_i/mean(L-))^alpha * (mean(H-)/H_i)^beta
    W = softmax(raw) within each subgroup;  R_i = W_i * r_i;  A_i = R_i - mean_g R
Short, confident correct answers get the largest share of +1; long, confident wrong answers the
largest share of -1. Groups that are all right or all wrong still carry signal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .common import advantage_metrics, broadcast_to_tokens, group_index, group_sum, grpo_scores, masked_sum
from .grpo import GRPOConfig, PPOFamily
from .registry import register_objective

_EPS = 1e-6  # added to the denominators, as the spec says


def sequence_entropy_proxy(logp: Tensor, mask: Tensor) -> Tensor:
    """H [N] = -sum_t exp(lp) * lp over valid tokens of rollout log-probs ``logp`` [N, T]."""
    lp = torch.where(mask, logp, torch.zeros_like(logp))
    return -masked_sum(torch.exp(lp) * lp, mask, dim=-1)


def fgo_weights(correct: Tensor, lengths: Tensor, entropies: Tensor, group: Tensor,
                alpha: float, beta: float) -> Tensor:
    """Softmax weights W [N] within each (group, correct) subgroup.

    correct [N] bool, lengths [N], entropies [N] (H_i), group [N] long.
    """
    dtype = torch.float64 if entropies.dtype == torch.float64 else torch.get_default_dtype()
    length, ent = lengths.to(dtype), entropies.to(dtype)
    ginv, _ = group_index(group)
    sub, k = group_index(ginv * 2 + correct.long())  # one id per (group, correct) subgroup
    count = group_sum(torch.ones_like(length), sub, k)
    mean_l = (group_sum(length, sub, k) / count)[sub]
    mean_h = (group_sum(ent, sub, k) / count)[sub]
    ent_term = (mean_h / (ent + _EPS)) ** beta
    len_term = torch.where(correct, mean_l / (length + _EPS), length / (mean_l + _EPS)) ** alpha
    raw = len_term * ent_term
    # softmax within the subgroup, shifted by the subgroup max for stability
    peak = torch.full((k,), -float("inf"), dtype=dtype, device=raw.device).scatter_reduce(0, sub, raw, "amax")
    e = torch.exp(raw - peak[sub])
    return e / group_sum(e, sub, k)[sub]


@dataclass(kw_only=True)
class FGOConfig(GRPOConfig):
    """FGO hyperparameters (``beta`` stays the KL coefficient; the paper's beta is entropy_beta)."""

    alpha: float = 0.01
    """exponent of the length term"""
    entropy_beta: float = 1.0
    """exponent of the entropy term (the paper's beta)"""
    reward_threshold: float = 0.5
    """a response is correct when its reward > reward_threshold"""
    norm_by_std: bool = False
    """divide R - mean_g R by the group std of R (off by default)"""


@register_objective("fgo")
class FGO(PPOFamily):
    """FGO: group reward reshaping by length and entropy, GRPO clipped term, token-mean."""

    Config = FGOConfig

    def advantages(self, rewards: Tensor, group: Tensor, mask: Tensor,
                   logp: Optional[Tensor] = None) -> Tensor:
        """rewards [N], group [N], mask [N, T], logp [N, T] rollout log-probs (required)."""
        if logp is None:
            raise ValueError("fgo advantages need the rollout log-probs `logp` [N, T]")
        mask = mask.bool()
        correct = rewards > self.cfg.reward_threshold
        lp = logp.detach().to(torch.float64 if rewards.dtype == torch.float64 else torch.get_default_dtype())
        ent = sequence_entropy_proxy(lp, mask)
        w = fgo_weights(correct, mask.sum(-1), ent, group, self.cfg.alpha, self.cfg.entropy_beta)
        shaped = w * torch.where(correct, 1.0, -1.0).to(w.dtype)
        score, m = grpo_scores(shaped, group, self.cfg.norm_by_std, self.cfg.std_unbiased)
        adv = broadcast_to_tokens(score, mask)
        self.last_advantage_metrics = {
            **m, **advantage_metrics(adv, mask),
            "fgo/weight_mean": float(w.mean()), "fgo/weight_min": float(w.min()),
            "fgo/weight_max": float(w.max()), "fgo/seq_entropy_mean": float(ent.mean()),
        }
        return adv
