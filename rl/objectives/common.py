"""Shared loss pieces: PPO clipped term, KL estimators, aggregation, group statistics.

Shapes: N sequences, T tokens (padded), G responses per prompt. Every function treats
``mask`` as the source of truth: values at masked positions are replaced (``torch.where``),
never multiplied by zero, so NaN/inf garbage in padding cannot leak into losses or gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

AGG_MODES = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)
KL_TYPES = ("k1", "k2", "k3")

Num = Union[float, Tensor]


@dataclass(frozen=True)
class LossNorm:
    """Global batch counts that normalize the aggregated loss.

    The learner computes it once from the full batch mask (all micro-batches, all data-parallel
    ranks) and passes it to every ``loss`` call; each piece then returns its share, so the sum
    over pieces equals the whole-batch loss and the gradient does not depend on the split.
    """

    num_tokens: float
    """valid tokens in the global batch (sum of the mask), the token-mean denominator"""
    num_seqs: float
    """sequences with at least one valid token in the global batch (seq-mean denominators)"""
    max_len: float
    """C of seq-mean-token-sum-norm (Dr. GRPO): the max response length, default the padded T"""

    @classmethod
    def from_mask(cls, mask: Tensor, max_len: Optional[int] = None) -> "LossNorm":
        """Counts of ``mask`` [N, T]; ``max_len`` defaults to T (pass the configured max)."""
        mask = mask.bool()
        lengths = mask.sum(-1)
        return cls(
            num_tokens=float(lengths.sum().item()),
            num_seqs=float((lengths > 0).sum().item()),
            max_len=float(mask.shape[-1] if max_len is None else max_len),
        )


def masked_sum(x: Tensor, mask: Tensor, dim=None) -> Tensor:
    """Sum of ``x`` over ``mask`` (masked entries replaced by 0, not multiplied)."""
    z = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return z.sum() if dim is None else z.sum(dim)


def masked_mean(x: Tensor, mask: Tensor) -> float:
    """Python-float mean of ``x`` over ``mask`` (0.0 for an empty mask); for metrics."""
    n = int(mask.sum().item())
    if n == 0:
        return 0.0
    return float(masked_sum(x.detach(), mask).item()) / n


def aggregate(loss: Tensor, mask: Tensor, mode: str, norm: Optional[LossNorm] = None) -> Tensor:
    """Reduce per-token ``loss`` [N, T] to a scalar over ``mask`` [N, T].

    token-mean:              sum(loss*mask) / num_tokens
    seq-mean-token-mean:     sum_i (sum_t loss[i,t] / L_i) / num_seqs
    seq-mean-token-sum:      sum(loss*mask) / num_seqs
    seq-mean-token-sum-norm: sum(loss*mask) / (num_seqs * max_len)     (Dr. GRPO, 2503.20783)

    ``norm`` carries the GLOBAL counts (see LossNorm); without it they come from ``mask``.
    Every mode is a sum of per-sequence terms over a global constant, which is what makes the
    sum over micro-batches / ranks equal the whole-batch value.
    """
    mask = mask.bool()
    if norm is None:
        norm = LossNorm.from_mask(mask)
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss_agg_mode {mode!r}; valid: {', '.join(AGG_MODES)}")
    if mode == "seq-mean-token-mean":
        lengths = mask.sum(-1).clamp_min(1).to(loss.dtype)
        total = (masked_sum(loss, mask, dim=-1) / lengths).sum()
        return total / max(norm.num_seqs, 1.0)
    total = masked_sum(loss, mask)
    if mode == "token-mean":
        return total / max(norm.num_tokens, 1.0)
    if mode == "seq-mean-token-sum":
        return total / max(norm.num_seqs, 1.0)
    return total / (max(norm.num_seqs, 1.0) * norm.max_len)


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str = "k3") -> Tensor:
    """Per-token KL(pi || ref) estimate [N, T] (Schulman's k1/k2/k3; GRPO 2402.03300 uses k3).

    k1 = lp - ref;  k2 = 0.5*(lp - ref)^2;  k3 = exp(d) - d - 1 with d = ref - lp.
    k3 clamps d to [-20, 20] and the result to [-10, 10], so one outlier token cannot overflow.
    """
    if kind == "k1":
        return logp - ref_logp
    if kind == "k2":
        return 0.5 * (logp - ref_logp).square()
    if kind == "k3":
        d = (ref_logp - logp).clamp(-20.0, 20.0)
        return (torch.exp(d) - d - 1.0).clamp(-10.0, 10.0)
    raise ValueError(f"unknown kl_type {kind!r}; valid: {', '.join(KL_TYPES)}")


def clipped_pg(
    ratio: Tensor,
    adv: Tensor,
    eps_low: Num,
    eps_high: Num,
    dual_clip_c: Optional[float] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate per token (to minimize), with optional dual clip.

    ratio, adv: [N, T]; eps_low / eps_high: floats or [N, T] tensors (HAPO's adaptive bounds).
    pg = max(-A*ratio, -A*clip(ratio, 1-eps_low, 1+eps_high)); dual clip (A < 0):
    pg = min(pg, -A*c), which bounds the loss of a negative-advantage token whose ratio exploded.
    Returns pg [N, T] and bool [N, T] flags: "high"/"low" (clipped branch active for A>0 / A<0)
    and "dual".
    """
    lo = 1.0 - eps_low
    hi = 1.0 + eps_high
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, lo, hi)
    is_clipped = clipped > unclipped
    pg = torch.where(is_clipped, clipped, unclipped)
    dual = torch.zeros_like(is_clipped)
    if dual_clip_c is not None:
        bound = -adv * dual_clip_c
        dual = (adv < 0) & (bound < pg)
        pg = torch.where(dual, bound, pg)
    flags = {"high": is_clipped & (adv > 0), "low": is_clipped & (adv < 0), "dual": dual}
    return pg, flags


def clip_metrics(flags: dict[str, Tensor], mask: Tensor) -> dict[str, float]:
    """clip_ratio (fraction of valid tokens whose clipped branch is active) and its parts."""
    out = {
        "clip_ratio/high": masked_mean(flags["high"].to(torch.float64), mask),
        "clip_ratio/low": masked_mean(flags["low"].to(torch.float64), mask),
    }
    out["clip_ratio"] = out["clip_ratio/high"] + out["clip_ratio/low"]
    if "dual" in flags:
        out["clip_ratio/dual"] = masked_mean(flags["dual"].to(torch.float64), mask)
    return out


# ---------------------------------------------------------------- group statistics

def group_index(group: Tensor) -> tuple[Tensor, int]:
    """Dense ids 0..K-1 for arbitrary group labels [N] -> (inverse [N] long, K)."""
    uniq, inv = torch.unique(group, return_inverse=True)
    return inv, int(uniq.numel())


def group_sum(values: Tensor, inv: Tensor, k: int) -> Tensor:
    """Per-group sum [K] of ``values`` [N] given dense ids ``inv`` [N]."""
    return torch.zeros(k, dtype=values.dtype, device=values.device).index_add_(0, inv, values)


def constant_groups(values: Tensor, inv: Tensor, k: int) -> Tensor:
    """[K] bool: True for groups whose ``values`` [N] are all equal (incl. groups of one)."""
    gmax = torch.full((k,), -math.inf, dtype=values.dtype, device=values.device)
    gmin = torch.full((k,), math.inf, dtype=values.dtype, device=values.device)
    gmax = gmax.scatter_reduce(0, inv, values, "amax")
    return gmax == gmin.scatter_reduce(0, inv, values, "amin")


def grpo_scores(
    rewards: Tensor, group: Tensor, norm_by_std: bool = True, std_unbiased: bool = True,
    eps: float = 1e-6,
) -> tuple[Tensor, dict[str, float]]:
    """Per-sequence GRPO score [N]: (r - mean_g r) / (std_g r + eps)  (DeepSeekMath, 2402.03300).

    ``norm_by_std=False`` gives Dr. GRPO's r - mean_g r (2503.20783). Groups of one and groups
    whose rewards are all equal get exactly 0 (not round-off noise over 1e-6).
    """
    r = rewards.to(torch.float64 if rewards.dtype == torch.float64 else torch.get_default_dtype())
    inv, k = group_index(group)
    count = group_sum(torch.ones_like(r), inv, k)
    mean = group_sum(r, inv, k) / count
    centred = r - mean[inv]
    ss = group_sum(centred.square(), inv, k)
    denom = (count - 1.0).clamp_min(1.0) if std_unbiased else count
    std = torch.sqrt(ss / denom)
    degenerate = (count < 2) | constant_groups(r, inv, k)
    score = centred / (std[inv] + eps) if norm_by_std else centred
    score = torch.where(degenerate[inv], torch.zeros_like(score), score)
    metrics = {"adv/zero_group_frac": float(degenerate.to(torch.float64).mean().item())}
    return score, metrics


def broadcast_to_tokens(score: Tensor, mask: Tensor) -> Tensor:
    """Per-sequence ``score`` [N] -> [N, T], zero where ``mask`` is false."""
    full = score[:, None].expand(mask.shape)
    return torch.where(mask.bool(), full, torch.zeros_like(full))


def advantage_metrics(adv: Tensor, mask: Tensor) -> dict[str, float]:
    """Mean / std / abs-max of the advantages over valid tokens (python floats)."""
    mask = mask.bool()
    vals = adv.detach()[mask].to(torch.float64)
    if vals.numel() == 0:
        return {"adv/mean": 0.0, "adv/std": 0.0, "adv/abs_max": 0.0}
    return {
        "adv/mean": float(vals.mean()),
        "adv/std": float(vals.std(unbiased=False)),
        "adv/abs_max": float(vals.abs().max()),
    }


# ---------------------------------------------------------------- off-policy (behavior) correction
# Decoupled PPO (docs/ALGORITHMS.md, "PPO epochs, mini-batches and off-policy correction"): the
# behavior policy mu (the rollout engine, whose log-probs come with the samples) sampled the
# tokens; the proximal policy pi_prox (the learner at the start of the step) anchors the clip.
# The importance weight w = pi_prox / mu corrects for the gap; it is a constant (no gradient).

BEHAVIOR_MODES = ("none", "truncate", "mask")

_LOG_W_BOUND = 20.0


def behavior_log_weight(prox_logp: Tensor, behavior_logp: Tensor, mask: Tensor) -> Tensor:
    """log w [N, T] = prox_logp - behavior_logp on valid tokens, 0 elsewhere (detached).

    prox_logp, behavior_logp: [N, T]; mask: [N, T] bool. Clamped to [-20, 20] so that one token
    the engine found far less likely than the learner cannot overflow exp (or its square in
    ``ess_sums``); a weight of e^20 is truncated or masked at any sensible cap anyway.
    """
    mask = mask.bool()
    d = (prox_logp.detach() - behavior_logp.detach().to(prox_logp.dtype)).clamp(-_LOG_W_BOUND, _LOG_W_BOUND)
    return torch.where(mask, d, torch.zeros((), dtype=d.dtype, device=d.device))


def sequence_log_mean(log_x: Tensor, mask: Tensor) -> Tensor:
    """[N]: mean over each row's valid tokens of ``log_x`` [N, T] (0 for an empty row); the log
    of the geometric mean, as GSPO's sequence ratio."""
    mask = mask.bool()
    lengths = mask.sum(-1).clamp_min(1).to(log_x.dtype)
    return masked_sum(log_x, mask, dim=-1) / lengths


def correct_weight(w: Tensor, mode: str, cap: float) -> Tensor:
    """Importance weights ``w`` (any shape, >= 0) -> the weights the loss applies (same shape).

    none: 1 everywhere (no correction); truncate: min(w, cap) (truncated importance sampling);
    mask: w where w <= cap, 0 where w > cap (the token is dropped from the policy loss).
    """
    if mode == "none":
        return torch.ones_like(w)
    if mode == "truncate":
        return w.clamp(max=cap)
    if mode == "mask":
        return torch.where(w > cap, torch.zeros_like(w), w)
    raise ValueError(f"unknown behavior correction mode {mode!r}; valid: {', '.join(BEHAVIOR_MODES)}")


def k3_from_log_ratio(log_ratio: Tensor) -> Tensor:
    """Per-token k3 estimate [same shape] of a KL from ``log_ratio`` = log(p/q) at tokens drawn
    from q: exp(d) - d - 1 >= 0. Under y ~ q, E[p/q - 1] = 0, so E[k3] = E[-log(p/q)] = KL(q || p)
    (unbiased, never negative, lower variance than k1 = -d).

    behavior/mismatch_kl: d = prox - behav (tokens from the behavior mu) -> KL(mu || pi_prox).
    actor/approx_kl:      d = old - logp -> the usual PPO approx_kl between the proximal and the
    current policy (KL(pi || pi_prox) if the tokens came from the current policy).
    """
    return torch.exp(log_ratio) - log_ratio - 1.0


def ess_sums(w: Tensor, mask: Tensor) -> tuple[float, float, float]:
    """(sum w, sum w^2, n) over the valid tokens of ``w`` [N, T] (float64): the pieces of
    ``ess_fraction``, summed over micro-batches and data-parallel ranks before dividing."""
    mask = mask.bool()
    v = w.detach()[mask].to(torch.float64)
    return float(v.sum()), float(v.square().sum()), float(v.numel())


def ess_fraction(sum_w: float, sum_w2: float, n: float) -> float:
    """Normalized effective sample size (sum w)^2 / (n * sum w^2), in (0, 1]: 1 when every weight
    is equal (on-policy), about 1/n when one weight dominates. 1.0 for no tokens."""
    if n <= 0 or sum_w2 <= 0:
        return 1.0
    return (sum_w * sum_w) / (n * sum_w2)
