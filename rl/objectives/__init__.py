"""Policy-gradient objectives of the GRPO family (pure torch: no ray, no vllm).

    from rl.objectives import get_objective, OBJECTIVES
    obj = get_objective("grpo", eps_high=0.28)
    adv = obj.advantages(rewards, group, mask, logp=None)               # [N] [N] [N,T] -> [N,T]
    norm, stats = obj.loss_norm(mask), obj.batch_stats(mask, entropy)   # once, global batch
    loss, metrics = obj.loss(logp, old_logp, adv, mask, ref_logp, entropy,
                             norm=norm, batch_stats=stats)              # per micro-batch / rank

See docs/ALGORITHMS.md for the formulas and worked numbers.
"""

from .base import Objective, PolicyLossConfig
from .common import AGG_MODES, KL_TYPES, LossNorm, aggregate, clipped_pg, kl_penalty
from .registry import OBJECTIVES, get_objective, objective_defaults, register_objective

# importing the family modules registers their objectives
from .grpo import DAPO, GRPO, DrGRPO, filter_groups, overlong_penalty  # noqa: E402
from .gspo import GSPO  # noqa: E402
from .fgo import FGO, fgo_weights  # noqa: E402
from .hapo import HAPO, EntropyStats, adaptive_temperature, entropy_score, entropy_stats  # noqa: E402
from .dhpo import DHPO  # noqa: E402

__all__ = [
    "OBJECTIVES", "get_objective", "objective_defaults", "register_objective",
    "Objective", "PolicyLossConfig", "LossNorm", "AGG_MODES", "KL_TYPES",
    "aggregate", "clipped_pg", "kl_penalty", "filter_groups", "overlong_penalty", "fgo_weights",
    "EntropyStats", "entropy_stats", "entropy_score", "adaptive_temperature",
    "GRPO", "DrGRPO", "DAPO", "GSPO", "FGO", "HAPO", "DHPO",
]
