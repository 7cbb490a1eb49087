"""HAPO: Heterogeneous Adaptive Policy Optimization (cited by title: "Heterogeneous Adaptive
Policy Optimization: Tailoring Optimization to Every Token's Nature"; arXiv id not verified here).

Token entropy drives every stage:
1. entropy score  x = log(max(ent, 1e-8)); m = q-quantile of x (nearest rank round(q*(n-1)));
   h = (x - m) / sqrt(mean((x - m)^2)); ĥ = h / max(h) for h > 0, h / |min(h)| for h <= 0.
2. adaptive temperature (rollout side)  T_t = T * (1 + tau * ĥ_t), with the statistics of the
   previous training step (``EntropyStats``) and ``adaptive_temperature``.
3. token-level group advantage: every valid token of y_i carries r_i; mean/std over the
   group's tokens; GRPO fallback for a group with any |A| >= 5.
4. asymmetric adaptive clipping: low-entropy tokens get a wider floor, high-entropy a wider cap.
5. differential advantage redistribution with A_ent = A * (1 + adv_beta * ĥ), no gradient.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from .base import Objective, PolicyLossConfig
from .common import (
    advantage_metrics, broadcast_to_tokens, clip_metrics, clipped_pg, group_index, group_sum,
    grpo_scores, masked_mean,
)
from .registry import register_objective

_TINY = 1e-12


@dataclass(frozen=True)
class EntropyStats:
    """Per-step statistics of x = log(entropy) over all valid tokens of a batch.

    Serializable (``to_dict`` / ``from_dict``): the learner sends them to the rollout workers
    so that ``adaptive_temperature`` maps a decoding step's entropy to ĥ on the same scale.
    """

    pivot: float
    """m: the entropy_pivot-quantile of x (x-space)"""
    scale: float
    """sqrt(mean((x - m)^2)) over the batch (x-space)"""
    h_max: float
    """max over the batch of h = (x - m) / scale"""
    h_min: float
    """min over the batch of h = (x - m) / scale"""
    code_compat: bool = False
    """reproduce the reference code's sign slip (ĥ >= 0)"""

    @property
    def x_max(self) -> float:
        """largest log-entropy of the batch (x-space)"""
        return self.pivot + self.h_max * self.scale

    @property
    def x_min(self) -> float:
        """smallest log-entropy of the batch (x-space)"""
        return self.pivot + self.h_min * self.scale

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EntropyStats":
        return cls(**d)


def entropy_stats(entropy: Tensor, mask: Tensor, pivot_q: float = 0.8,
                  code_compat: bool = False) -> EntropyStats:
    """EntropyStats of ``entropy`` [N, T] over ``mask`` [N, T] (the whole batch, once)."""
    x = torch.log(entropy.detach()[mask.bool()].to(torch.float64).clamp_min(1e-8))
    n = x.numel()
    if n == 0:
        return EntropyStats(0.0, 1.0, 1.0, -1.0, code_compat)
    # nearest rank with Python's round (half to even), as the spec's round(q*(n-1))
    m = torch.sort(x).values[int(round(pivot_q * (n - 1)))]
    scale = float(torch.sqrt((x - m).square().mean()))
    h = (x - m) / max(scale, _TINY)
    return EntropyStats(float(m), scale, float(h.max()), float(h.min()), code_compat)


def entropy_score(entropy: Tensor, stats: EntropyStats) -> Tensor:
    """ĥ in [-1, 1], same shape as ``entropy``, from the batch ``stats``.

    Values outside the batch range (new tokens at rollout time) are clamped to [-1, 1].
    code_compat: the reference code divides h <= 0 by min(h) instead of |min(h)|, giving ĥ >= 0.
    """
    x = torch.log(entropy.clamp_min(1e-8))
    h = (x - stats.pivot) / max(stats.scale, _TINY)
    pos = h / max(stats.h_max, _TINY)
    neg_den = stats.h_min if stats.code_compat else abs(stats.h_min)
    neg = h / (neg_den if abs(neg_den) > _TINY else _TINY)
    return torch.where(h > 0, pos, neg).clamp(-1.0, 1.0)


def logits_entropy(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) per row: logits [..., V] (any float dtype) -> [...] float32.

    The entropy HAPO scores, on both sides: the rollout's processor on the raw next-token logits
    of a decoding step (`adaptive_temperature`), the learner on the raw logits of the training
    forward (rl.learner.update with `Objective.entropy_of_raw_logits`), so that EntropyStats
    computed by the learner place the rollout's entropies on the same scale."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)


def adaptive_temperature(logits: Tensor, stats: Optional[EntropyStats], base_temperature: float,
                         tau: float = 0.05) -> Tensor:
    """Per-row sampling temperature T_t = T * (1 + tau * ĥ_t) -> [B].

    logits [B, V] raw next-token logits of one decoding step; ĥ_t comes from each row's entropy
    mapped with the previous training step's ``stats``; stats None (first step) -> T everywhere.
    A vLLM logits processor wraps this on the rollout side.
    """
    if stats is None:
        return torch.full(logits.shape[:-1], float(base_temperature), dtype=torch.float32,
                          device=logits.device)
    return base_temperature * (1.0 + tau * entropy_score(logits_entropy(logits), stats))


def hapo_token_advantage(rewards: Tensor, group: Tensor, mask: Tensor, fallback: float = 5.0,
                         std_unbiased: bool = True) -> tuple[Tensor, Tensor]:
    """Per-sequence score [N] of the token-level group average, and per-group fallback flags [K].

    mu, sd = mean and population std over all valid tokens of the group (token i carries r_i),
    A_i = (r_i - mu) / (sd + 1e-6); a group with any |A_i| >= fallback uses the GRPO score.
    """
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.get_default_dtype()
    r = rewards.to(dtype)
    length = mask.bool().sum(-1).to(dtype)
    inv, k = group_index(group)
    tokens = group_sum(length, inv, k)
    mu = group_sum(length * r, inv, k) / tokens.clamp_min(1.0)
    var = group_sum(length * (r - mu[inv]).square(), inv, k) / tokens.clamp_min(1.0)
    score = (r - mu[inv]) / (var.sqrt()[inv] + 1e-6)
    big = torch.where(length > 0, score.abs() >= fallback, torch.zeros_like(length, dtype=torch.bool))
    use_grpo = group_sum(big.to(dtype), inv, k) > 0
    grpo, _ = grpo_scores(r, group, True, std_unbiased)  # also zero for degenerate groups
    score = torch.where(use_grpo[inv], grpo, score)
    # exact zeros for groups of one / all-equal rewards (grpo_scores already is 0 there)
    degenerate = group_sum((grpo != 0).to(dtype), inv, k) == 0
    score = torch.where(degenerate[inv], torch.zeros_like(score), score)
    return score, use_grpo


def hapo_token_loss(ratio: Tensor, adv: Tensor, h_hat: Tensor, eps_low: float, eps_high: float,
                    clip_alpha: float = 1.0, adv_beta: float = 1.0,
                    dual_clip_c: Optional[float] = 10.0) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """Per-token HAPO loss [N, T] given ratio, adv, ĥ [N, T].

    Asymmetric clipping: ĥ <= 0 widens the floor cl = eps_low*(1 - clip_alpha*ĥ), ĥ > 0 widens the
    cap ch = eps_high*(1 + clip_alpha*ĥ). Redistribution (no gradient): in the neutral zone
    1 - cl/2 < ratio < 1 + ch/2 low-entropy tokens use A_ent = A*(1 + adv_beta*ĥ) and
    high-entropy tokens plain A; outside the zone the other way round.
    Returns (loss, clip flags, bool [N, T] "A_ent used").
    """
    low_h = h_hat <= 0
    cl = torch.where(low_h, eps_low * (1.0 - clip_alpha * h_hat), torch.full_like(h_hat, eps_low))
    ch = torch.where(low_h, torch.full_like(h_hat, eps_high), eps_high * (1.0 + clip_alpha * h_hat))
    r = ratio.detach()
    inside = (r > 1.0 - cl / 2) & (r < 1.0 + ch / 2)
    use_ent = inside == low_h
    a = torch.where(use_ent, adv * (1.0 + adv_beta * h_hat), adv)
    pg, flags = clipped_pg(ratio, a, cl, ch, dual_clip_c)
    return pg, flags, use_ent


@dataclass(kw_only=True)
class HAPOConfig(PolicyLossConfig):
    """HAPO hyperparameters."""

    dual_clip_c: Optional[float] = 10.0
    """dual clip bound for negative advantages"""
    entropy_pivot: float = 0.8
    """q of the quantile pivot m of log-entropy"""
    clip_alpha: float = 1.0
    """strength of the entropy-adaptive clip widening"""
    adv_beta: float = 1.0
    """strength of the entropy-weighted advantage A_ent = A*(1 + adv_beta*ĥ)"""
    adv_fallback: float = 5.0
    """a group with any |A| >= this falls back to the GRPO advantage"""
    std_unbiased: bool = True
    """Bessel-corrected std of the GRPO fallback advantage"""
    tau: float = 0.05
    """rollout adaptive temperature T_t = T*(1 + tau*ĥ_t)"""
    hapo_code_compat: bool = False
    """reproduce the public reference code's sign slip (ĥ >= 0)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.entropy_pivot <= 1.0:
            raise ValueError(f"entropy_pivot must be in [0, 1], got {self.entropy_pivot}")


@register_objective("hapo")
class HAPO(Objective):
    """HAPO: entropy-adaptive advantages, clipping and redistribution; token-mean.

    ``loss`` needs ``entropy`` [N, T]; pass ``batch_stats=obj.batch_stats(full_mask,
    entropy=full_entropy)`` when the batch is split, so ĥ uses the global pivot and scale.
    """

    Config = HAPOConfig

    @property
    def needs_entropy(self) -> bool:
        return True

    @property
    def needs_batch_stats(self) -> bool:
        return True

    #: ĥ is scored on the entropy of the raw logits on both sides: the rollout processor sees
    #: them before vLLM divides by T, so the learner's statistics and per-token ĥ must too.
    entropy_of_raw_logits = True

    def batch_stats(self, mask: Tensor, entropy: Optional[Tensor] = None) -> EntropyStats:
        """EntropyStats over all valid tokens of the FULL batch (also what rollout workers get)."""
        if entropy is None:
            raise ValueError("hapo batch_stats needs entropy [N, T]")
        return entropy_stats(entropy, mask, self.cfg.entropy_pivot, self.cfg.hapo_code_compat)

    def temperatures(self, logits: Tensor, stats: Optional[EntropyStats], base_temperature: float) -> Tensor:
        """adaptive_temperature with this objective's tau: logits [B, V] -> [B]."""
        return adaptive_temperature(logits, stats, base_temperature, self.cfg.tau)

    #: Rollout side: the vLLM logits processor that samples at T_t.
    rollout_logits_processor = "rollout.hapo_temperature:HAPOTemperatureProcessor"

    def rollout_sampling_args(self, stats: Optional[EntropyStats]) -> dict[str, Any]:
        """SamplingParams.extra_args for the next rollout: tau and the last step's ``stats``
        (None before the first update: the processor then samples at T)."""
        return {"hapo_temperature": {"tau": self.cfg.tau,
                                     "stats": stats.to_dict() if stats is not None else None}}

    def advantages(self, rewards: Tensor, group: Tensor, mask: Tensor,
                   logp: Optional[Tensor] = None) -> Tensor:
        """rewards [N], group [N], mask [N, T] -> token-level group advantage [N, T]."""
        score, fell_back = hapo_token_advantage(rewards, group, mask, self.cfg.adv_fallback,
                                                self.cfg.std_unbiased)
        adv = broadcast_to_tokens(score, mask)
        self.last_advantage_metrics = {
            **advantage_metrics(adv, mask),
            "hapo/fallback_group_frac": float(fell_back.to(torch.float64).mean()),
        }
        return adv

    def token_loss(self, logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor,
                   entropy: Optional[Tensor], batch_stats: Any) -> tuple[Tensor, dict[str, float]]:
        stats = batch_stats if batch_stats is not None else self.batch_stats(mask, entropy)
        h_hat = torch.where(mask, entropy_score(entropy, stats), torch.zeros_like(entropy))
        ratio = torch.exp(logp - old_logp)
        c = self.cfg
        pg, flags, use_ent = hapo_token_loss(ratio, adv, h_hat, c.eps_low, c.eps_high,
                                             c.clip_alpha, c.adv_beta, c.dual_clip_c)
        metrics = clip_metrics(flags, mask)
        metrics["ratio/mean"] = masked_mean(ratio, mask)
        metrics["hapo/h_hat_mean"] = masked_mean(h_hat, mask)
        metrics["hapo/high_entropy_frac"] = masked_mean((h_hat > 0).to(h_hat.dtype), mask)
        metrics["hapo/adv_ent_frac"] = masked_mean(use_ent.to(h_hat.dtype), mask)
        return pg, metrics


__all__ = ["HAPO", "EntropyStats", "entropy_stats", "entropy_score", "logits_entropy", "adaptive_temperature",
           "hapo_token_advantage", "hapo_token_loss"]
