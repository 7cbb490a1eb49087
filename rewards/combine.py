"""Turn per-function outcomes into one reward per sample, validity, and metrics.

Combination rule (N samples, functions f with weights w_f, scores r_f(i)):

    reward(i) = sum_{f applicable} w_f * r_f(i) * (sum_f |w_f|) / (sum_{f applicable} |w_f|)

A function is not applicable to sample i when it returned None. The surviving weights are
scaled up so that the total weight stays the same (absolute values, so that a negative
penalty weight does not flip the sign of the scaling). When no function applies, the reward
is 0.0 and the sample is counted in `reward/unscored`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from rewards.calling import OK, TIMEOUT, Outcome
from rewards.loading import LoadedReward


@dataclass
class RewardResult:
    """Scores of one step. N = number of completions."""

    rewards: list[float]  # [N] weighted combination; 0.0 where valid is False
    valid: list[bool]  # [N] False: dropped by on_error="skip_group"
    metrics: dict[str, float]
    scores: dict[str, list[float | None]] = field(default_factory=dict)
    """Per function, [N] scores after on_error; None = not applicable or dropped."""
    failures: list[str] = field(default_factory=list)
    """One line per error or timeout (function, sample, message), for logs."""


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


def combine(functions: Sequence[LoadedReward], outcomes: Sequence[Sequence[Outcome | None]],
            group: Sequence[int], on_error: str, error_value: float) -> RewardResult:
    """outcomes[f][i] for every function f and sample i -> RewardResult (see module docstring)."""
    n = len(group)
    valid = [True] * n
    metrics: dict[str, float] = {}
    failures: list[str] = []
    scores: dict[str, list[float | None]] = {}
    bad_groups: set[int] = set()
    total_errors = total_timeouts = 0
    for f, row in zip(functions, outcomes):
        col: list[float | None] = [None] * n
        genuine: list[float] = []
        subs: dict[str, list[float]] = {}
        errors = timeouts = nones = 0
        for i, outcome in enumerate(row):
            if outcome is None:  # never scored: only possible if the step was aborted
                raise RuntimeError(f"reward function {f.name!r} has no outcome for sample {i}")
            status, value, sub = outcome
            if status == OK:
                col[i] = value
                if value is None:
                    nones += 1
                else:
                    genuine.append(value)
                for k, v in (sub or {}).items():
                    subs.setdefault(k, []).append(v)
                continue
            if status == TIMEOUT:
                timeouts += 1
            else:
                errors += 1
            failures.append(f"{f.name} sample {i}: {'timeout' if status == TIMEOUT else 'error'}: {value}")
            if on_error == "value":
                col[i] = error_value
            elif on_error == "skip_group":
                bad_groups.add(group[i])
        scores[f.name] = col
        p = f"reward/{f.name}"
        if genuine:  # mean/std of real scores only: error_value substitutes would bias them
            metrics[f"{p}/mean"], metrics[f"{p}/std"] = _mean_std(genuine)
        for k, vals in subs.items():
            metrics[f"{p}/{k}/mean"] = sum(vals) / len(vals)
        metrics[f"{p}/count"] = float(len(genuine))
        metrics[f"{p}/none"] = float(nones)
        metrics[f"{p}/errors"] = float(errors)
        metrics[f"{p}/timeouts"] = float(timeouts)
        total_errors += errors
        total_timeouts += timeouts

    for i in range(n):
        if group[i] in bad_groups:
            valid[i] = False
    total_weight = sum(abs(f.weight) for f in functions)
    rewards = [0.0] * n
    unscored = 0
    for i in range(n):
        if not valid[i]:
            continue
        applicable = [(f.weight, scores[f.name][i]) for f in functions if scores[f.name][i] is not None]
        if not applicable:
            unscored += 1
            continue
        weight = sum(abs(w) for w, _ in applicable)
        scale = total_weight / weight if weight > 0 else 0.0
        rewards[i] = sum(w * s for w, s in applicable) * scale
    kept = [r for r, v in zip(rewards, valid) if v]
    if kept:
        metrics["reward/mean"], metrics["reward/std"] = _mean_std(kept)
    metrics["reward/errors"] = float(total_errors)
    metrics["reward/timeouts"] = float(total_timeouts)
    metrics["reward/invalid"] = float(n - sum(valid))
    metrics["reward/unscored"] = float(unscored)
    return RewardResult(rewards, valid, metrics, scores, failures)
