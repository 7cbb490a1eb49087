"""GSPO: Group Sequence Policy Optimization (arXiv:2507.18071).

The importance ratio is defined per sequence, length-normalized:
    s_i = exp( sum_t mask*(lp - old) / L_i )
and clipped per sequence (ranges ~1e-4, since s_i is a geometric mean of token ratios).
Token form used for gradients: s[i,t] = sg(s_i) * exp(lp[i,t] - sg(lp[i,t])), whose value is
s_i and whose gradient w.r.t. lp[i,t] is s_i; with seq-mean-token-mean this is exactly the
gradient of the sequence objective.

Off-policy correction (``behavior_weights``) is at the same level: the sequence weight
w_i = exp(mean_t (prox - behav)), the geometric mean of the token weights, truncated or masked
as a whole and applied to every token of y_i.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from .common import (
    broadcast_to_tokens, clip_metrics, clipped_pg, correct_weight, masked_mean, masked_sum,
    sequence_log_mean,
)
from .grpo import GRPO, GRPOConfig
from .registry import register_objective


def seq_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """log s_i [N] = mean over valid tokens of (lp - old); 0 for an empty sequence."""
    lengths = mask.sum(-1).clamp_min(1).to(logp.dtype)
    return masked_sum(logp - old_logp, mask, dim=-1) / lengths


def seq_ratio_tokens(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """GSPO token-form ratio [N, T]: value s_i on every token, d/d lp[i,t] = s_i."""
    log_s = seq_log_ratio(logp, old_logp, mask).detach()
    return torch.exp(log_s[:, None] + logp - logp.detach())


@dataclass(kw_only=True)
class GSPOConfig(GRPOConfig):
    """GSPO hyperparameters: sequence-level clip ranges."""

    eps_low: float = 3e-4
    """lower clip range of the sequence ratio s_i"""
    eps_high: float = 4e-4
    """upper clip range of the sequence ratio s_i"""
    loss_agg_mode: str = "seq-mean-token-mean"
    """aggregation (GSPO averages per sequence, then over sequences)"""


@register_objective("gspo")
class GSPO(GRPO):
    """GSPO (arXiv:2507.18071): GRPO advantage, clipped sequence ratio, seq-mean-token-mean."""

    Config = GSPOConfig

    def token_loss(self, logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor,
                   entropy: Optional[Tensor], batch_stats: Any) -> tuple[Tensor, dict[str, float]]:
        s = seq_ratio_tokens(logp, old_logp, mask)  # [N, T]
        pg, flags = clipped_pg(s, adv, self.cfg.eps_low, self.cfg.eps_high, self.cfg.dual_clip_c)
        metrics = clip_metrics(flags, mask)
        metrics["ratio/mean"] = masked_mean(s, mask)
        return pg, metrics

    def behavior_weights(self, log_w: Tensor, mask: Tensor, mode: str, cap: float,
                         entropy: Optional[Tensor] = None) -> Tensor:
        """Sequence level: w_i = exp(mean over y_i's valid tokens of log_w) [N] (the geometric
        mean of the token weights, as s_i is of the token ratios), truncated / masked per
        sequence, on every valid token of y_i -> [N, T] (0 where ``mask`` is false)."""
        w_seq = correct_weight(torch.exp(sequence_log_mean(log_w, mask)), mode, cap)
        return broadcast_to_tokens(w_seq, mask)
