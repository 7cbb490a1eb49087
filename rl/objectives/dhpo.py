"""DHPO: Dynamic Hybrid Policy Optimization (GRPO token ratio + GSPO sequence ratio).

NOTE: the paper's full text was not public when this was written; this implementation follows
its abstract: each branch is clipped in its own trust region BEFORE mixing, and the two ratios
are mixed either with a fixed average or with entropy-guided per-token weights.

    r_t  = exp(lp_t - old_t)                 token ratio (GRPO)
    s_i  = exp(mean_t (lp_t - old_t))        sequence ratio (GSPO, arXiv:2507.18071), exact:
                                             its gradient reaches every token of y_i
    rc_t = clip(r_t, 1-eps_tl, 1+eps_th);    sc_i = clip(s_i, 1-eps_sl, 1+eps_sh)
    arithmetic: R_t = w_t r_t + (1-w_t) s_i,      Rc_t = w_t rc_t + (1-w_t) sc_i
    geometric:  R_t = r_t^w_t * s_i^(1-w_t),      Rc_t = rc_t^w_t * sc_i^(1-w_t)
    loss_t = max(-A_i R_t, -A_i Rc_t), token-mean.
    mixing average: w_t = 0.5; mixing entropy: w_t = sg(ent_t / max_{t' in y_i} ent_t'), so
    high-entropy "forking" tokens lean on the token ratio, the rest on the sequence ratio.

Off-policy correction (``behavior_weights``): each branch's weight is corrected (truncated or
masked) at its own level, the token weight W_t = c(exp(log_w_t)) and GSPO's sequence weight
W_i = c(exp(mean_t log_w_t)), then mixed with the same w_t and form as the ratios:
arithmetic w_t W_t + (1 - w_t) W_i, geometric W_t^w_t W_i^(1 - w_t). The mixed weight multiplies
the mixed per-token loss; that is the exact decoupled gradient at w_t = 0 or 1 (or W_t = W_i),
and a per-token blend of the two otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from .common import clip_metrics, correct_weight, masked_mean, sequence_log_mean
from .grpo import GRPO, GRPOConfig
from .gspo import seq_log_ratio
from .registry import register_objective

MIXINGS = ("average", "entropy")
MIXING_FORMS = ("arithmetic", "geometric")


def entropy_mix_weight(entropy: Tensor, mask: Tensor) -> Tensor:
    """w [N, T] = ent / max of ent over the valid tokens of the same response (detached).

    A response whose entropies are all zero gets w = 0 (pure sequence ratio).
    """
    ent = torch.where(mask, entropy.detach(), torch.zeros_like(entropy))
    peak = ent.amax(dim=-1, keepdim=True).clamp_min(1e-12)
    return ent / peak


def dhpo_token_loss(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, w: Tensor,
                    eps_tl: float, eps_th: float, eps_sl: float, eps_sh: float,
                    form: str = "arithmetic") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token DHPO loss [N, T]; also returns R, Rc [N, T] and the clipped flag [N, T]."""
    log_r = logp - old_logp
    # exact s_i (differentiable through every token of y_i), not GSPO's token form: the two
    # agree only when a response's tokens share A, w and the clip state, which DHPO's per-token
    # mixing and per-token clipping break; the exact form keeps the loss's gradient its derivative
    log_s = seq_log_ratio(logp, old_logp, mask)[:, None].expand_as(logp)
    if form == "arithmetic":
        r, s = torch.exp(log_r), torch.exp(log_s)
        rc = r.clamp(1.0 - eps_tl, 1.0 + eps_th)
        sc = s.clamp(1.0 - eps_sl, 1.0 + eps_sh)
        big_r = w * r + (1.0 - w) * s
        big_rc = w * rc + (1.0 - w) * sc
    elif form == "geometric":
        # clip in log space: identical values and gradients to clipping the ratio itself
        log_rc = log_r.clamp(math.log1p(-eps_tl), math.log1p(eps_th))
        log_sc = log_s.clamp(math.log1p(-eps_sl), math.log1p(eps_sh))
        big_r = torch.exp(w * log_r + (1.0 - w) * log_s)
        big_rc = torch.exp(w * log_rc + (1.0 - w) * log_sc)
    else:
        raise ValueError(f"unknown mixing_form {form!r}; valid: {', '.join(MIXING_FORMS)}")
    unclipped, clipped = -adv * big_r, -adv * big_rc
    is_clipped = clipped > unclipped
    return torch.where(is_clipped, clipped, unclipped), big_r, big_rc, is_clipped


@dataclass(kw_only=True)
class DHPOConfig(GRPOConfig):
    """DHPO hyperparameters: eps_low / eps_high are the token branch's ranges."""

    eps_high: float = 0.28
    """upper clip range of the token ratio branch"""
    seq_eps_low: float = 3e-4
    """lower clip range of the sequence ratio branch"""
    seq_eps_high: float = 4e-4
    """upper clip range of the sequence ratio branch"""
    mixing: str = "average"
    """mixing weight of the token branch: average (0.5) or entropy (ent / max ent in response)"""
    mixing_form: str = "arithmetic"
    """arithmetic w*r + (1-w)*s, or geometric r^w * s^(1-w)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mixing not in MIXINGS:
            raise ValueError(f"mixing {self.mixing!r}; valid: {', '.join(MIXINGS)}")
        if self.mixing_form not in MIXING_FORMS:
            raise ValueError(f"mixing_form {self.mixing_form!r}; valid: {', '.join(MIXING_FORMS)}")
        if self.dual_clip_c is not None:
            raise ValueError("dhpo does not support dual_clip_c")


@register_objective("dhpo")
class DHPO(GRPO):
    """DHPO (Dynamic Hybrid Policy Optimization; paper text not public, follows its abstract).

    GRPO advantage; loss mixes the separately clipped token and sequence ratios (module doc).
    """

    Config = DHPOConfig

    @property
    def needs_entropy(self) -> bool:
        return self.cfg.mixing == "entropy"

    def mix_weight(self, like: Tensor, mask: Tensor, entropy: Optional[Tensor]) -> Tensor:
        """w [N, T] (shape and dtype of ``like``): 0.5 (average) or ent / max ent (entropy)."""
        if self.cfg.mixing == "entropy":
            if entropy is None:
                raise ValueError(f"objective {self.name!r} with mixing: entropy needs per-token entropy")
            return entropy_mix_weight(entropy.to(like.dtype), mask)
        return torch.full_like(like, 0.5)

    def token_loss(self, logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor,
                   entropy: Optional[Tensor], batch_stats: Any) -> tuple[Tensor, dict[str, float]]:
        w = self.mix_weight(logp, mask, entropy)
        c = self.cfg
        pg, big_r, _, is_clipped = dhpo_token_loss(
            logp, old_logp, adv, mask, w, c.eps_low, c.eps_high, c.seq_eps_low, c.seq_eps_high,
            c.mixing_form)
        metrics = clip_metrics({"high": is_clipped & (adv > 0), "low": is_clipped & (adv < 0)}, mask)
        metrics["ratio/mean"] = masked_mean(big_r, mask)
        metrics["dhpo/mix_weight_mean"] = masked_mean(w, mask)
        return pg, metrics

    def behavior_weights(self, log_w: Tensor, mask: Tensor, mode: str, cap: float,
                         entropy: Optional[Tensor] = None) -> Tensor:
        """The token weight and the sequence weight, each truncated / masked at its own level,
        mixed with the loss's mixing weight w_t and form (module docstring) -> [N, T]."""
        mask = mask.bool()
        w_tok = correct_weight(torch.exp(log_w), mode, cap)
        w_seq = correct_weight(torch.exp(sequence_log_mean(log_w, mask)), mode, cap)[:, None].expand_as(log_w)
        mix = self.mix_weight(log_w, mask, entropy)
        if self.cfg.mixing_form == "geometric":  # pow: 0^0 = 1, so a masked branch at weight 0 drops out
            out = torch.pow(w_tok, mix) * torch.pow(w_seq, 1.0 - mix)
        else:
            out = mix * w_tok + (1.0 - mix) * w_seq
        return torch.where(mask, out, torch.zeros_like(out))
