"""Objective base class and the hyperparameters every policy loss shares.

An objective is two pure functions behind one signature (the conformance interface):

    adv = obj.advantages(rewards, group, mask, logp=None)      # [N] [N] [N,T] [N,T] -> [N,T]
    loss, metrics = obj.loss(logp, old_logp, adv, mask, ref_logp=None, entropy=None,
                             *, norm=None, batch_stats=None, behavior_weight=None)

Micro-batch / data-parallel invariance: the learner calls ``norm = obj.loss_norm(full_mask)``
and ``stats = obj.batch_stats(full_mask, entropy=full_entropy)`` ONCE for the global batch and
passes both to every piece's ``loss``; the pieces' losses then sum to the whole-batch loss.

Around them, the driver hooks declared on ``Objective`` (each with a no-op default, so a new
objective overrides only what it uses): reward shaping, a group filter for dynamic sampling,
a vLLM logits processor and its per-step arguments, batch statistics, advantage metrics.
docs/OBJECTIVES.md shows how to add an objective in one file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from .common import (
    AGG_MODES, KL_TYPES, LossNorm, aggregate, correct_weight, kl_penalty, masked_mean,
)
from .registry import build_config


@dataclass(kw_only=True)
class PolicyLossConfig:
    """Hyperparameters shared by every objective (subclasses change defaults, add fields)."""

    eps_low: float = 0.2
    """lower clip range: the ratio is clipped below at 1 - eps_low"""
    eps_high: float = 0.2
    """upper clip range: the ratio is clipped above at 1 + eps_high"""
    dual_clip_c: Optional[float] = None
    """dual clip bound c > 1 for negative advantages (typically 3); None turns it off"""
    beta: float = 0.0
    """KL-to-reference coefficient; 0 turns the KL term (and the reference model) off"""
    kl_type: str = "k3"
    """KL estimator: k1, k2 or k3"""
    loss_agg_mode: str = "token-mean"
    """aggregation: token-mean, seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm"""
    max_response_len: Optional[int] = None
    """C of seq-mean-token-sum-norm (and DAPO's Lmax); None -> the batch's padded length T"""

    def __post_init__(self) -> None:
        if self.loss_agg_mode not in AGG_MODES:
            raise ValueError(f"loss_agg_mode {self.loss_agg_mode!r}; valid: {', '.join(AGG_MODES)}")
        if self.kl_type not in KL_TYPES:
            raise ValueError(f"kl_type {self.kl_type!r}; valid: {', '.join(KL_TYPES)}")
        if self.eps_low < 0 or self.eps_high < 0 or self.eps_low >= 1:
            raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {self.eps_low}, {self.eps_high}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1:
            raise ValueError(f"dual_clip_c must be > 1 or None, got {self.dual_clip_c}")
        if self.max_response_len is not None and self.max_response_len <= 0:
            raise ValueError(f"max_response_len must be positive, got {self.max_response_len}")


class Objective:
    """Base objective: subclasses define ``Config``, ``advantages`` and ``token_loss``."""

    Config = PolicyLossConfig
    name: str = "base"

    def __init__(self, **hparams: Any) -> None:
        self.cfg = build_config(self.Config, hparams, f"objective {self.name!r}")
        #: metrics of the last ``advantages`` call (python floats), for the driver to log
        self.last_advantage_metrics: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.cfg})"

    @property
    def needs_ref(self) -> bool:
        """True when ``loss`` needs ``ref_logp`` (a KL term is on)."""
        return self.cfg.beta > 0

    @property
    def needs_entropy(self) -> bool:
        """True when ``loss`` needs per-token ``entropy`` [N, T] of the current policy."""
        return False

    entropy_of_raw_logits: bool = False
    """True when the ``entropy`` that ``loss`` and ``batch_stats`` get is that of the raw logits
    (temperature 1), not of the logits divided by the sampling temperature: the learner then
    computes it so when rollout.temperature != 1 (HAPO, whose rollout processor scores raw
    logits)."""

    # ------------------------------------------------------------ driver hooks
    # The trainer calls these on every objective; the defaults do nothing.

    rollout_logits_processor: Optional[str] = None
    """"module:Class" of a vLLM V1 logits processor the rollout engines load (HAPO's adaptive
    temperature), as an import path so that objectives stay free of vllm; None: none."""

    def rollout_sampling_args(self, batch_stats: Any) -> Optional[dict[str, Any]]:
        """``SamplingParams.extra_args`` for the next rollout, from the last update's batch
        statistics (None before the first update); None: no extra arguments."""
        return None

    @property
    def shapes_rewards(self) -> bool:
        """True when ``shape_rewards`` changes rewards (the driver then logs reward/shaped_mean)."""
        return False

    def shape_rewards(self, rewards: Tensor, lengths: Tensor, max_len: Optional[int] = None) -> Tensor:
        """rewards [N] float64, response ``lengths`` [N] -> shaped rewards [N] (identity here)."""
        return rewards

    def check_response_length(self, max_len: int) -> None:
        """Raise ValueError, before any actor starts, when the objective cannot work with
        responses of at most ``max_len`` tokens."""

    @property
    def uses_dynamic_sampling(self) -> bool:
        """True when the driver should draw generation batches until ``keep_groups`` keeps
        enough groups (DAPO), logging dynamic_sampling/* metrics."""
        return False

    @property
    def max_gen_batches(self) -> int:
        """Most generation batches per step under dynamic sampling."""
        return 1

    def keep_groups(self, rewards: Tensor, group: Tensor) -> Tensor:
        """rewards [N], group [N] -> keep-mask [N] bool (every sample kept here)."""
        return torch.ones_like(group, dtype=torch.bool)

    def advantage_metrics(self) -> dict[str, float]:
        """Metrics of the last ``advantages`` call (python floats) for the driver to log."""
        return {k: float(v) for k, v in self.last_advantage_metrics.items()}

    @property
    def needs_batch_stats(self) -> bool:
        """True when ``loss`` depends on statistics of the whole batch (``batch_stats``); the
        learners then compute them over every rank's tokens before the update."""
        return False

    def behavior_weights(self, log_w: Tensor, mask: Tensor, mode: str, cap: float,
                         entropy: Optional[Tensor] = None) -> Tensor:
        """Off-policy correction weights [N, T] for ``loss(behavior_weight=...)``.

        log_w [N, T]: per-token log importance weight prox_logp - behavior_logp between the
        proximal policy (the learner at the start of the step) and the behavior policy (the
        rollout engine), 0 where ``mask`` [N, T] bool is false (``common.behavior_log_weight``).
        mode: none | truncate | mask, cap: C > 0 (``common.correct_weight``); entropy [N, T]:
        the current policy's per-token entropy (detached; DHPO's entropy mixing), or None.

        Default: token level, w_t = exp(log_w_t), then truncated (min(w_t, C)) or masked (0 where
        w_t > C). Sequence-level objectives override it to weight at their level (GSPO: the
        geometric mean over the response; DHPO: the mix of token and sequence weights).
        """
        return correct_weight(torch.exp(log_w), mode, cap)

    # ------------------------------------------------------------ global statistics
    def loss_norm(self, mask: Tensor, max_len: Optional[int] = None) -> LossNorm:
        """Global counts from the FULL batch mask [N, T]; pass the result as ``loss(norm=...)``."""
        return LossNorm.from_mask(mask, max_len if max_len is not None else self.cfg.max_response_len)

    def batch_stats(self, mask: Tensor, entropy: Optional[Tensor] = None) -> Any:
        """Batch-level statistics ``loss`` depends on (None for most objectives).

        Compute once over the FULL batch and pass as ``loss(batch_stats=...)``.
        """
        return None

    # ------------------------------------------------------------ advantages
    def advantages(self, rewards: Tensor, group: Tensor, mask: Tensor,
                   logp: Optional[Tensor] = None) -> Tensor:
        """rewards [N], group [N] long, mask [N, T] bool, logp [N, T] -> advantages [N, T]."""
        raise NotImplementedError

    # ------------------------------------------------------------ loss
    def token_loss(self, logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor,
                   entropy: Optional[Tensor], batch_stats: Any) -> tuple[Tensor, dict[str, float]]:
        """Per-token loss [N, T] from sanitized inputs (masked entries already zeroed)."""
        raise NotImplementedError

    def loss(
        self,
        logp: Tensor,
        old_logp: Tensor,
        adv: Tensor,
        mask: Tensor,
        ref_logp: Optional[Tensor] = None,
        entropy: Optional[Tensor] = None,
        *,
        norm: Optional[LossNorm] = None,
        batch_stats: Any = None,
        behavior_weight: Optional[Tensor] = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Scalar loss (differentiable in ``logp``) and python-float metrics.

        logp, old_logp, adv, ref_logp, entropy: [N, T]; mask: [N, T] bool. old_logp, adv,
        ref_logp and entropy are treated as constants (detached).
        norm: global LossNorm from ``loss_norm(full_mask)``; without it the counts come from
            ``mask``, which is only right when this call sees the whole batch.
        batch_stats: from ``batch_stats(full_mask, entropy=...)`` for objectives with batch-level
            statistics (HAPO); without it they are computed from this call's tensors.
        behavior_weight: [N, T] off-policy correction weights from ``behavior_weights`` (treated
            as constants); they multiply the per-token POLICY loss before aggregation (not the
            KL term, and not the denominators). None: no correction (weight 1).
        """
        mask = mask.bool()
        zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
        lp = torch.where(mask, logp, zero)
        old = torch.where(mask, old_logp.detach().to(logp.dtype), zero)
        a = torch.where(mask, adv.detach().to(logp.dtype), zero)
        ent = None
        if entropy is not None:
            ent = torch.where(mask, entropy.detach().to(logp.dtype), zero)
        if self.needs_entropy and ent is None:
            raise ValueError(f"objective {self.name!r} needs per-token entropy")
        per_token, metrics = self.token_loss(lp, old, a, mask, ent, batch_stats)
        if behavior_weight is not None:
            one = torch.ones((), dtype=logp.dtype, device=logp.device)
            per_token = per_token * torch.where(mask, behavior_weight.detach().to(logp.dtype), one)
        if self.cfg.beta > 0:
            if ref_logp is None:
                raise ValueError(f"objective {self.name!r} has beta > 0 and needs ref_logp")
            ref = torch.where(mask, ref_logp.detach().to(logp.dtype), zero)
            kl = kl_penalty(lp, ref, self.cfg.kl_type)
            per_token = per_token + self.cfg.beta * kl
            metrics["kl"] = masked_mean(kl, mask)
        if ent is not None:
            metrics["entropy"] = masked_mean(ent, mask)
        if norm is None:
            norm = self.loss_norm(mask)
        out = aggregate(per_token, mask, self.cfg.loss_agg_mode, norm)
        return out, metrics
