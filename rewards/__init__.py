"""Reward functions: registry, loading by import path or file, built-ins, and the executor.

    from rewards import RewardFunctionConfig, load_reward_functions, RewardExecutor
    fns = load_reward_functions([RewardFunctionConfig(path="math_verify")])
    with RewardExecutor(fns, timeout_s=10.0, on_error="skip_group") as ex:
        result = ex.score(prompts, completions, {"answer": answers}, group)

See docs/REWARDS.md for the conventions (TRL, verl, plain) and the config keys.
"""

from rewards.combine import RewardResult
from rewards.executor import RewardExecutor
from rewards.config import RewardConfig, RewardFunctionConfig
from rewards.errors import RewardError
from rewards.loading import LoadedReward, load_reward_functions
from rewards.registry import register, registered_names

__all__ = [
    "LoadedReward",
    "RewardError",
    "RewardExecutor",
    "RewardResult",
    "RewardConfig",
    "RewardFunctionConfig",
    "load_reward_functions",
    "register",
    "registered_names",
]
