"""Where the run's actors go: one Ray placement group, one bundle per actor.

Ray's own means, nothing else: the run reserves a placement group (`ray.placement_strategy`:
PACK, SPREAD or STRICT_SPREAD) whose bundles are, in order, one per rollout worker and one per
learner. Each bundle holds what its actor asks for: the CPUs and GPUs of `rl/actors.py`
(`_actor_options`) plus the extra custom resources of `ray.rollout_resources` /
`ray.learner_resources`, so `ray start --resources '{"rollout_node": 1}'` on one machine and
`ray.rollout_resources: {rollout_node: 1}` in the config pin the rollout workers there.

The group is made once per Ray job and kept: a replaced actor takes its predecessor's bundle.
Reserving is all-or-nothing, so a request the cluster cannot meet would wait forever; it waits
`ray.placement_timeout_s`, then names what was asked for and what the cluster has.
"""

from __future__ import annotations

import itertools

import ray
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rl.config import Config
from rl.errors import UserError

ROLES = ("rollout", "learner")

# Ray rejects a bundle that reserves nothing. CPU-only actors reserve no CPUs (the phases of a
# step take turns on the cores, rl/actors.py), so their bundle holds this token share: it is
# what pins the actor to the bundle's node, not a limit on what it may use.
TOKEN_CPU = 0.01

_groups: dict[tuple, PlacementGroup] = {}
"""The placement groups this process made, by (Ray job, bundles, strategy)."""
_numbers = itertools.count()


def extra_resources(config: Config, role: str) -> dict[str, float]:
    """`ray.rollout_resources` or `ray.learner_resources`: added to each actor's request."""
    return dict(config.ray.rollout_resources if role == "rollout" else config.ray.learner_resources)


def bundles(config: Config, base: dict) -> list[dict[str, float]]:
    """One bundle per actor, rollout workers first: `base` (the actor's num_cpus / num_gpus)
    plus the role's extra resources; a bundle that would be empty gets TOKEN_CPU."""
    out = []
    for role, count in (("rollout", config.rollout.workers), ("learner", config.learner.workers)):
        bundle = {"CPU": base.get("num_cpus", 0), "GPU": base.get("num_gpus", 0), **extra_resources(config, role)}
        bundle = {k: float(v) for k, v in bundle.items() if v}
        out += [bundle or {"CPU": TOKEN_CPU}] * count
    return out


def placement_options(config: Config, role: str, index: int, base: dict) -> dict:
    """The `.options(...)` arguments that put actor `index` of `role` in its bundle of the run's
    placement group (made and waited for on the first call): its extra resources and the
    scheduling strategy. `base` is the actor's num_cpus / num_gpus (`_actor_options`)."""
    if role not in ROLES:
        raise ValueError(f"role {role!r}: use one of {ROLES}")
    group = run_placement_group(config, base)
    offset = 0 if role == "rollout" else config.rollout.workers
    opts: dict = {"scheduling_strategy": PlacementGroupSchedulingStrategy(
        placement_group=group, placement_group_bundle_index=offset + index)}
    extra = extra_resources(config, role)
    if extra:
        opts["resources"] = extra
    return opts


def run_placement_group(config: Config, base: dict) -> PlacementGroup:
    """The run's placement group, reserved and ready (the same one on every call of a job).

    A cached group is reused only while the cluster still reports it CREATED: after
    `ray.shutdown()` and a new local `ray.init()`, the new cluster's first job has the same job id
    as the old one, and an actor sent to the old cluster's group would wait forever (infeasible).
    """
    wanted = bundles(config, base)
    strategy = config.ray.placement_strategy
    key = (ray.get_runtime_context().get_job_id(), repr(wanted), strategy)
    if key in _groups:
        if placement_group_table(_groups[key]).get("state") == "CREATED":
            return _groups[key]
        del _groups[key]
    group = placement_group(wanted, strategy=strategy, name=f"rl-infinite-{key[0]}-{next(_numbers)}")
    try:
        ray.get(group.ready(), timeout=config.ray.placement_timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)  # a pending group would grab the resources once they appear
        raise UserError(unplaceable_message(config, wanted)) from None
    _groups[key] = group
    return group


def release() -> None:
    """Give back the placement groups this process made (their actors are gone)."""
    while _groups:
        _, group = _groups.popitem()
        try:
            remove_placement_group(group)
        except Exception:  # Ray already shut down: the group went with it
            pass


def unplaceable_message(config: Config, wanted: list[dict]) -> str:
    """What was asked for, what each alive node has, and what to change."""
    r = config.ray
    rollout, learner = config.rollout.workers, config.learner.workers
    asked = "; ".join([f"rollout {i}: {_fmt(b)}" for i, b in enumerate(wanted[:rollout])]
                      + [f"learner {i}: {_fmt(b)}" for i, b in enumerate(wanted[rollout:])])
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    have = "; ".join(f"node {n['NodeID'][:12]} ({n.get('NodeManagerAddress', '?')}): {_fmt(n.get('Resources', {}))}"
                     for n in nodes) or "no alive node"
    free = _fmt(ray.available_resources())
    strategy = ("use ray.placement_strategy: PACK or SPREAD (STRICT_SPREAD needs a node per actor)"
                if r.placement_strategy == "STRICT_SPREAD" else "check the names against the nodes' resources above")
    return (f"ray.placement_strategy = {r.placement_strategy!r}: Ray could not reserve one bundle per actor "
            f"({rollout} rollout + {learner} learner) within ray.placement_timeout_s = {r.placement_timeout_s:g} s. "
            f"Asked for (ray.rollout_resources = {dict(r.rollout_resources)}, ray.learner_resources = "
            f"{dict(r.learner_resources)} added to each actor's CPUs/GPUs): {asked}. The cluster has "
            f"{len(nodes)} node(s): {have}; free now: {free}. Fix: start nodes that carry those resources "
            f"(`ray start --address HEAD:6379 --resources '{{\"name\": 1}}'`), lower rollout.workers / "
            f"learner.workers or the resources asked for, {strategy}, or raise ray.placement_timeout_s while "
            f"nodes are joining.")


def _fmt(resources: dict) -> str:
    """Resources for a person: no memory sizes, node markers or placement-group bookkeeping."""
    shown = {k: v for k, v in resources.items()
             if k not in ("memory", "object_store_memory") and not k.startswith("node:") and "_group_" not in k}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items())) + "}"
