"""Bounded staleness: how far rollouts may run ahead of the learner (`trainer.max_staleness`).

k = 0 is the synchronous loop. k >= 1 lets the rollouts of the next k steps run while the
learner trains; no sample more than k versions old is trained on. `auto` picks k each step
from what it measures: it lowers k when the importance weights between the behavior and the
proximal policy degenerate (`behavior/ess_fraction` below `trainer.auto_staleness_min_ess`),
and raises it, up to `trainer.auto_staleness_max`, when the learner waited for rollouts.
"""

from __future__ import annotations

from rollout.records import Sample

# The learner "waited" when the step spent more than this share of its time blocked on rollouts.
_WAIT_SHARE = 0.05


class StalenessControl:
    def __init__(self, trainer_config):
        c = trainer_config
        self.auto = c.max_staleness == "auto"
        self.k = 1 if self.auto else int(c.max_staleness)
        self.min_ess = c.auto_staleness_min_ess
        self.max_k = c.auto_staleness_max

    def observe(self, metrics: dict) -> None:
        """After a step: adjust k (auto only) from its metrics."""
        if not self.auto:
            return
        ess = metrics.get("behavior/ess_fraction")
        waited = metrics.get("time/wait_rollout", 0.0) > _WAIT_SHARE * metrics.get("time/step", float("inf"))
        if ess is not None and ess < self.min_ess:
            self.k = max(0, self.k - 1)
        elif waited:
            self.k = min(self.max_k, self.k + 1)


def staleness_metrics(samples: list[Sample], learner_version: int) -> dict[str, float]:
    """staleness/mean and /max over the trained samples: learner version minus the version
    that generated each sample."""
    ages = [learner_version - s.policy_version for s in samples]
    return {"staleness/mean": sum(ages) / len(ages), "staleness/max": float(max(ages))}
