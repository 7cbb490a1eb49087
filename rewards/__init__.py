"""Reward functions: registry, loading by import path or file, built-ins, and the executor.

    from rewards import RewardSpec, load_reward_functions, RewardExecutor
    fns = load_reward_functions([RewardSpec(path="math_verify")])
    with RewardExecutor(fns, timeout_s=10.0, on_error="skip_group") as ex:
        result = ex.score(prompts, completions, {"answer": answers}, group)

See docs/REWARDS.md for the conventions (TRL, verl, plain) and the config keys.
"""

from rewards.combine import RewardResult
from rewards.executor import RewardExecutor
from rewards.loading import LoadedReward, RewardError, RewardSpec, load_reward_functions
from rewards.registry import register, registered_names

__all__ = [
    "LoadedReward",
    "RewardError",
    "RewardExecutor",
    "RewardResult",
    "RewardSpec",
    "load_reward_functions",
    "register",
    "registered_names",
]
