"""The `reward` section of the config: which functions score a sample and what a failure does.

`rl.config.Config` composes this section with the others; it lives here, next to the code that
reads it, so that `rewards` depends on no other package of the project. Checks run in
`__post_init__`, when the config is loaded, before Ray starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from rewards.errors import RewardError

CONVENTIONS = ("trl", "verl", "plain")
ON_ERROR = ("raise", "skip_group", "value")


@dataclass
class RewardFunctionConfig:
    """One entry of `reward.functions`."""

    path: str = "arithmetic"
    """Built-in name (`math_verify`), `module:function`, or `path/to/file.py:function`."""
    weight: float = 1.0
    """Weight in the weighted sum of rewards."""
    name: str | None = None
    """Name in metrics (`reward/<name>/mean`); default: the built-in or function name."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Constant keyword arguments passed on every call (they win over same-named columns)."""
    convention: str | None = None
    """trl | verl | plain; null detects it from the signature."""

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path.strip():
            raise RewardError(f"reward.functions: path must be a non-empty string, got {self.path!r}. "
                              "Fix: `path: module:function`, `path: file.py:function` or a built-in name.")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight):
            raise RewardError(f"reward.functions: {self.path!r}: weight = {self.weight!r} must be a finite number.")
        if self.convention is not None and self.convention not in CONVENTIONS:
            raise RewardError(
                f"reward.functions: {self.path!r}: convention = {self.convention!r} is unknown; "
                f"use one of {list(CONVENTIONS)} or leave it out to detect it from the signature.")
        if not isinstance(self.kwargs, dict):
            raise RewardError(f"reward.functions: {self.path!r}: kwargs = {self.kwargs!r} must be a mapping.")
        self.kwargs = dict(self.kwargs)  # an omegaconf DictConfig -> a plain, picklable dict


@dataclass
class RewardConfig:
    functions: list[RewardFunctionConfig] = field(default_factory=lambda: [RewardFunctionConfig()])
    """Reward functions, summed with their weights."""
    timeout_s: float = 10.0
    """Seconds one call may take before it counts as a timeout."""
    on_error: str = "raise"
    """raise | skip_group | value: what a failing or timed-out call does."""
    error_value: float = 0.0
    """Reward used for a failed call when on_error is `value` (counted in reward/errors)."""
    workers: int = 2
    """Reward worker processes."""

    def __post_init__(self) -> None:
        if self.on_error not in ON_ERROR:
            raise RewardError(f"reward.on_error = {self.on_error!r} is not valid: use one of {', '.join(ON_ERROR)}.")
        if self.workers <= 0:
            raise RewardError(f"reward.workers = {self.workers} must be a positive integer.")
        if not self.timeout_s > 0:
            raise RewardError(f"reward.timeout_s = {self.timeout_s} must be > 0 (seconds per call).")
        if not math.isfinite(self.error_value):
            raise RewardError(f"reward.error_value = {self.error_value} must be finite.")
        if not self.functions:
            raise RewardError("reward.functions is empty: name at least one reward function, "
                              "e.g. `reward.functions=[{path: arithmetic}]`.")
