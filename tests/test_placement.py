"""Placement without a cluster: the config keys, the bundles of the run's placement group, the
per-node path check and how its error reaches the driver. The same on a real 2-node Ray
cluster: tests/test_cluster.py (slow)."""

import os

import pytest

from rl.config import load_config
from rl.errors import ConfigError, UserError, raised_in_actor
from rl.node_paths import require_on_this_node
from rl.placement import TOKEN_CPU, bundles


def test_defaults_change_nothing():
    c = load_config(None, [])
    assert c.ray.rollout_resources == {} and c.ray.learner_resources == {}
    assert c.ray.placement_strategy == "PACK" and c.ray.placement_timeout_s > 0


@pytest.mark.parametrize("override, words", [
    ("ray.placement_strategy=spread_out", ["ray.placement_strategy", "'spread_out'", "PACK, SPREAD, STRICT_SPREAD"]),
    ("ray.rollout_resources={GPU: 1}", ["ray.rollout_resources", "'GPU'", "custom resources"]),
    ("ray.learner_resources={learner_node: 0}", ["ray.learner_resources.learner_node = 0.0", "remove the key"]),
    ("ray.placement_timeout_s=-1", ["ray.placement_timeout_s = -1", "> 0"]),
])
def test_bad_values_name_field_value_and_fix(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    for w in words:
        assert w in str(e.value), str(e.value)


def test_one_bundle_per_actor_rollout_first_with_the_extra_resources():
    c = load_config(None, ["rollout.workers=2", "learner.workers=3", "ray.rollout_resources={rollout_node: 1}",
                           "ray.learner_resources={learner_node: 0.5, fast_disk: 1}"])
    got = bundles(c, {"num_cpus": 1, "num_gpus": 0.5})
    assert got == [{"CPU": 1.0, "GPU": 0.5, "rollout_node": 1.0}] * 2 + \
                  [{"CPU": 1.0, "GPU": 0.5, "learner_node": 0.5, "fast_disk": 1.0}] * 3


def test_cpu_only_actors_reserve_a_token_cpu_share():
    # Ray rejects empty bundles; CPU-only actors reserve no CPUs (rl/actors.py), so the bundle
    # gets a token share, and nothing else, unless the config adds resources
    c = load_config(None, ["ray.learner_resources={learner_node: 1}"])
    got = bundles(c, {"num_cpus": 0})
    assert got == [{"CPU": TOKEN_CPU}, {"learner_node": 1.0}]


def test_missing_absolute_path_names_the_path_and_node(tmp_path):
    there = tmp_path / "model"
    there.mkdir()
    require_on_this_node({"model.path": str(there), "checkpoint": None})  # present, nothing to check
    require_on_this_node({"model.path": "Qwen/Qwen3-1.7B"})  # a hub name: each node downloads it
    missing = str(tmp_path / "gone")
    with pytest.raises(UserError) as e:
        require_on_this_node({"model.path": str(there), "checkpoint": missing})
    text = str(e.value)
    assert f"checkpoint = {missing!r} does not exist on node " in text
    assert os.uname().nodename in text  # outside Ray: the host name
    assert "every node" in text and "hub name" in text


def test_actor_constructor_error_reaches_the_driver_as_its_message():
    # what Ray gives the driver when an actor's __init__ raised: the traceback as text
    class ActorDied(Exception):
        pass

    remote = ("The actor died because of an error raised in its creation task, ray::RolloutActor.__init__() "
              "(pid=1, ip=10.0.0.2)\n  File \"rl/node_paths.py\", line 30, in require_on_this_node\n"
              "rl.errors.UserError: model.path = '/m' does not exist on node abc (10.0.0.2), where Ray placed "
              "this actor. Fix it.\n")
    try:
        try:
            raise ActorDied(remote)
        except ActorDied as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as e:
        assert raised_in_actor(e) == ("model.path = '/m' does not exist on node abc (10.0.0.2), where Ray "
                                      "placed this actor. Fix it.")
    assert raised_in_actor(ValueError("unrelated")) is None


def test_local_model_path_resolves_to_an_absolute_directory(tiny_model_dir, monkeypatch):
    from rl.train import resolve_model_path

    parent, name = os.path.split(tiny_model_dir)
    monkeypatch.chdir(parent)
    assert resolve_model_path(f"./{name}") == tiny_model_dir
    assert os.path.isabs(resolve_model_path(f"./{name}"))


def test_unplaceable_message_names_request_nodes_and_fix(monkeypatch):
    import rl.placement as placement

    nodes = [{"Alive": True, "NodeID": "a" * 56, "NodeManagerAddress": "10.0.0.1",
              "Resources": {"CPU": 8.0, "GPU": 1.0, "memory": 1e10, "node:10.0.0.1": 1.0, "rollout_node": 1.0}},
             {"Alive": False, "NodeID": "b" * 56, "NodeManagerAddress": "10.0.0.2", "Resources": {"CPU": 8.0}}]
    monkeypatch.setattr(placement.ray, "nodes", lambda: nodes)
    monkeypatch.setattr(placement.ray, "available_resources",
                        lambda: {"CPU": 7.0, "GPU_group_0_abc": 1.0, "rollout_node": 1.0})
    c = load_config(None, ["ray.learner_resources={learner_node: 1}", "ray.placement_strategy=STRICT_SPREAD",
                           "ray.placement_timeout_s=30"])
    text = placement.unplaceable_message(c, bundles(c, {"num_cpus": 1, "num_gpus": 0.5}))
    assert "ray.placement_strategy = 'STRICT_SPREAD'" in text and "ray.placement_timeout_s = 30 s" in text
    assert "learner 0: {CPU: 1, GPU: 0.5, learner_node: 1}" in text  # what was asked for
    assert f"1 node(s): node {'a' * 12} (10.0.0.1): {{CPU: 8, GPU: 1, rollout_node: 1}}" in text  # alive only
    assert "free now: {CPU: 7, rollout_node: 1}" in text  # no placement-group bookkeeping
    assert "STRICT_SPREAD needs a node per actor" in text and "ray start --address" in text


@pytest.mark.slow
def test_a_new_local_cluster_gets_a_new_group_not_the_old_clusters():
    """After ray.shutdown() and a new ray.init(), the new cluster's first job has the old job id;
    the cached group of the old cluster must not be handed out (its actors would wait forever)."""
    import ray
    from ray.util.placement_group import placement_group_table

    from rl.placement import release, run_placement_group

    c = load_config(None, [])
    groups = []
    try:
        for _ in range(2):
            ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
            groups.append(run_placement_group(c, {"num_cpus": 0}))
            assert placement_group_table(groups[-1])["state"] == "CREATED"
            ray.shutdown()
    finally:
        release()
        ray.shutdown()
    assert groups[0].id != groups[1].id
