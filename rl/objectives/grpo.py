"""GRPO, Dr. GRPO and DAPO: group-normalized sequence advantages + PPO clipped term.

- GRPO (DeepSeekMath, arXiv:2402.03300): A_i = (r_i - mean_g r) / (std_g r + 1e-6).
- Dr. GRPO (arXiv:2503.20783): A_i = r_i - mean_g r, loss seq-mean-token-sum-norm; dropping the
  std and the per-length normalization removes GRPO's question-difficulty and length biases.
- DAPO (arXiv:2503.14476): GRPO advantage, clip-higher (eps_high 0.28), token-mean, no KL, plus
  two reward/batch-side pieces the driver calls: ``overlong_penalty`` and ``filter_groups``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from .base import Objective, PolicyLossConfig
from .common import (
    advantage_metrics, broadcast_to_tokens, clip_metrics, clipped_pg, constant_groups, group_index,
    grpo_scores, masked_mean,
)
from .registry import register_objective


def overlong_penalty(lengths: Tensor, max_len: int, cache_len: int, factor: float = 1.0) -> Tensor:
    """DAPO soft overlong punishment (arXiv:2503.14476, eq. 13), added to the reward.

    lengths [N] response lengths; E = max_len - cache_len:
    0 if L <= E;  (E - L) / cache_len if E < L <= max_len;  -1 if L > max_len; times ``factor``.
    Returns float [N].
    """
    if cache_len <= 0 or cache_len > max_len:
        raise ValueError(f"need 0 < cache_len <= max_len, got {cache_len}, {max_len}")
    length = lengths.to(torch.float64)
    expected = float(max_len - cache_len)
    ramp = (expected - length) / float(cache_len)
    pen = torch.where(length <= expected, torch.zeros_like(length), ramp)
    pen = torch.where(length > max_len, torch.full_like(length, -1.0), pen)
    return (pen * factor).to(torch.get_default_dtype())


def filter_groups(rewards: Tensor, group: Tensor) -> Tensor:
    """DAPO dynamic sampling keep-mask [N] bool: False for every member of a group whose
    rewards are all equal (zero advantage -> no gradient, it only dilutes the batch)."""
    inv, k = group_index(group)
    return ~constant_groups(rewards.to(torch.float64), inv, k)[inv]


@dataclass(kw_only=True)
class GRPOConfig(PolicyLossConfig):
    """GRPO hyperparameters."""

    norm_by_std: bool = True
    """divide the centred group reward by the group std (Dr. GRPO turns it off)"""
    std_unbiased: bool = True
    """Bessel-corrected group std (n - 1); False gives the population std"""


class PPOFamily(Objective):
    """Token-ratio PPO clipped loss; subclasses only choose advantages and defaults."""

    def token_loss(self, logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor,
                   entropy: Optional[Tensor], batch_stats: Any) -> tuple[Tensor, dict[str, float]]:
        ratio = torch.exp(logp - old_logp)  # [N, T]; masked entries are exp(0) = 1
        pg, flags = clipped_pg(ratio, adv, self.cfg.eps_low, self.cfg.eps_high, self.cfg.dual_clip_c)
        metrics = clip_metrics(flags, mask)
        metrics["ratio/mean"] = masked_mean(ratio, mask)
        return pg, metrics


@register_objective("grpo")
class GRPO(PPOFamily):
    """GRPO (DeepSeekMath, arXiv:2402.03300): group-normalized advantage, PPO clip, token-mean."""

    Config = GRPOConfig

    def advantages(self, rewards: Tensor, group: Tensor, mask: Tensor,
                   logp: Optional[Tensor] = None) -> Tensor:
        """rewards [N], group [N] -> A [N, T] = per-sequence score on every valid token."""
        score, m = grpo_scores(rewards, group, self.cfg.norm_by_std, self.cfg.std_unbiased)
        adv = broadcast_to_tokens(score, mask)
        self.last_advantage_metrics = {**m, **advantage_metrics(adv, mask)}
        return adv


@dataclass(kw_only=True)
class DrGRPOConfig(GRPOConfig):
    """Dr. GRPO: no std normalization, constant-length normalization."""

    norm_by_std: bool = False
    """divide the centred group reward by the group std (off: Dr. GRPO's unbiased advantage)"""
    loss_agg_mode: str = "seq-mean-token-sum-norm"
    """aggregation (Dr. GRPO divides by N * C, C the max response length)"""


@register_objective("dr_grpo")
class DrGRPO(GRPO):
    """Dr. GRPO (arXiv:2503.20783): A_i = r_i - mean_g r, seq-mean-token-sum-norm."""

    Config = DrGRPOConfig


@dataclass(kw_only=True)
class DAPOConfig(GRPOConfig):
    """DAPO hyperparameters (clip-higher, dynamic sampling, overlong shaping)."""

    eps_high: float = 0.28
    """clip-higher: a larger upper range keeps low-probability tokens able to grow"""
    filter_groups: bool = True
    """dynamic sampling: drop groups whose rewards are all equal"""
    max_gen_batches: int = 10
    """dynamic sampling: at most this many generation rounds to fill the batch"""
    overlong_shaping: bool = True
    """add the soft overlong penalty to rewards (needs max_response_len)"""
    overlong_buffer_len: int = 4096
    """Lcache: length of the soft-penalty interval before max_response_len"""
    overlong_penalty_factor: float = 1.0
    """scale of the overlong penalty (-1 at the hard limit)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_gen_batches < 1:
            raise ValueError(f"max_gen_batches must be >= 1, got {self.max_gen_batches}")
        if self.overlong_buffer_len <= 0:
            raise ValueError(f"overlong_buffer_len must be positive, got {self.overlong_buffer_len}")


@register_objective("dapo")
class DAPO(GRPO):
    """DAPO (arXiv:2503.14476): GRPO advantage, eps 0.2/0.28, token-mean, beta 0.

    Driver hooks: ``shape_rewards`` (overlong penalty) and ``keep_groups`` (dynamic-sampling
    filter); the driver calls them before ``advantages``.
    """

    Config = DAPOConfig

    @property
    def shapes_rewards(self) -> bool:
        return True

    @property
    def uses_dynamic_sampling(self) -> bool:
        return True

    @property
    def max_gen_batches(self) -> int:
        return self.cfg.max_gen_batches

    def check_response_length(self, max_len: int) -> None:
        self.shape_rewards(torch.zeros(1), torch.zeros(1), max_len=max_len)

    def shape_rewards(self, rewards: Tensor, lengths: Tensor, max_len: Optional[int] = None) -> Tensor:
        """rewards [N] + overlong penalty of response ``lengths`` [N] (if overlong_shaping)."""
        if not self.cfg.overlong_shaping:
            return rewards
        lmax = max_len if max_len is not None else self.cfg.max_response_len
        if lmax is None:
            raise ValueError("overlong shaping needs max_len or max_response_len")
        pen = overlong_penalty(lengths, lmax, self.cfg.overlong_buffer_len, self.cfg.overlong_penalty_factor)
        return rewards + pen.to(rewards.dtype)

    def keep_groups(self, rewards: Tensor, group: Tensor) -> Tensor:
        """Keep-mask [N] bool (all True when filter_groups is off)."""
        if not self.cfg.filter_groups:
            return torch.ones_like(group, dtype=torch.bool)
        return filter_groups(rewards, group)


__all__ = ["GRPO", "DrGRPO", "DAPO", "GRPOConfig", "overlong_penalty", "filter_groups"]
