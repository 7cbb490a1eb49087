"""What a plan holds: memory items (label, bytes, formula) per actor, the rollout and learner
actor plans, and the whole plan with its JSON form (`Plan.to_dict`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from rl.plan.architectures import Architecture


@dataclass
class Item:
    label: str
    bytes: int
    formula: str = ""


@dataclass
class ActorPlan:
    role: str
    """rollout | learner"""
    count: int
    gpu_share: float
    """GPUs per actor (0 on CPU)."""
    items: list[Item] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(i.bytes for i in self.items)


@dataclass
class Plan:
    config_path: str
    model: Architecture
    device: str
    device_bytes: int
    gpus: int
    rollout: ActorPlan
    learner: ActorPlan
    per_device: list[tuple[str, int]]
    """The heaviest mix of actors on one device: (what, bytes)."""
    warnings: list[str]
    layout: str
    kv_bytes_per_token: int
    kv_capacity_tokens: int

    @property
    def device_total(self) -> int:
        return sum(b for _, b in self.per_device)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"]["params"] = self.model.params
        d["device_total"] = self.device_total
        d["rollout"]["total"], d["learner"]["total"] = self.rollout.total, self.learner.total
        return d
