"""Config: YAML + overrides into typed dataclasses, and errors that name field, value and fix."""

import pytest

from rl.config import config_to_dict, load_config
from rl.errors import ConfigError


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  prompts_per_step: 3\nrollout:\n  group_size: 5\nobjective:\n  name: dapo\n  eps_high: 0.3\n")
    c = load_config(path, ["rollout.group_size=6", "learner.lr=3e-4", "reward.functions=[{path: exact_match, weight: 2}]"])
    assert c.data.prompts_per_step == 3
    assert c.rollout.group_size == 6  # override wins over YAML
    assert c.learner.lr == pytest.approx(3e-4)
    assert c.objective.name == "dapo" and c.objective.params == {"eps_high": 0.3}
    assert c.reward.functions[0].path == "exact_match" and c.reward.functions[0].weight == 2.0


def test_round_trip_through_dict(tmp_path):
    from omegaconf import OmegaConf

    c = load_config(None, ["objective.name=hapo", "objective.tau=0.1", "model.lora.rank=4"])
    path = tmp_path / "resolved.yaml"
    OmegaConf.save(OmegaConf.create(config_to_dict(c)), path)
    again = load_config(path)
    assert again == c


@pytest.mark.parametrize("override, expected", [
    (["data.colum=1"], ["data.colum", "prompt_key", "prompts_per_step"]),
    (["bogus.x=1"], ["bogus", "model", "trainer"]),
    (["model.lora.rnk=4"], ["model.lora.rnk", "rank", "alpha"]),
])
def test_unknown_key_lists_valid_keys(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    for word in expected:
        assert word in str(e.value)


def test_wrong_type_names_field_and_value():
    with pytest.raises(ConfigError, match=r"rollout.group_size = 'eight'.*expected int"):
        load_config(None, ["rollout.group_size=eight"])
    with pytest.raises(ConfigError, match=r"trainer.total_steps"):
        load_config(None, ["trainer.total_steps=1.5"])


def test_bad_values():
    with pytest.raises(ConfigError, match="model.dtype = 'int4'"):
        load_config(None, ["model.dtype=int4"])
    with pytest.raises(ConfigError, match="reward.on_error"):
        load_config(None, ["reward.on_error=ignore"])
    with pytest.raises(ConfigError, match="data.prompts_per_step = 0"):
        load_config(None, ["data.prompts_per_step=0"])


def test_objective_name_and_hyperparameters_validated():
    with pytest.raises(ConfigError, match="grpo.*dr_grpo.*dapo"):
        load_config(None, ["objective.name=ppo"])
    with pytest.raises(ConfigError, match="objective.epsilon.*eps_low"):
        load_config(None, ["objective.epsilon=0.2"])
    with pytest.raises(ConfigError, match="loss_agg_mode"):
        load_config(None, ["objective.loss_agg_mode=mean"])


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/config.yaml")


def test_shipped_configs_validate():
    from pathlib import Path

    configs = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))
    assert configs, "configs/ has no YAML"
    for path in configs:
        load_config(path)


# --- rollout.scheduler: keys per policy, micro groups, the KV budget ---------------------------

@pytest.mark.parametrize("policy, key, value, readers", [
    ("full_group", "micro_group_size", 4, "naive_micro, continuous, length_aware"),
    ("full_group", "slots", 16, "naive_micro, continuous, length_aware"),
    ("continuous", "fptas_eps", 0.1, "length_aware"),
    ("continuous", "predictor", "constant", "length_aware"),
    ("naive_micro", "predictor", "token_conditioned", "length_aware"),  # the default value, but set
    ("naive_micro", "regroup_fraction", 0.3, "length_aware"),
    ("continuous", "tail_guard", False, "length_aware"),
    ("full_group", "admission", "conservative", "length_aware"),
    ("naive_micro", "admission_horizon", 32, "length_aware"),
    ("full_group", "preemption", "predicted_longest", "length_aware"),
])
def test_a_scheduler_key_the_policy_does_not_read_is_rejected(policy, key, value, readers):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"rollout.scheduler.policy={policy}", f"rollout.scheduler.{key}={value}"])
    msg = str(e.value)
    assert f"rollout.scheduler.{key}" in msg and f"policy {policy!r}" in msg and f"read by {readers}" in msg


@pytest.mark.parametrize("policy", ["full_group", "naive_micro", "continuous", "length_aware"])
def test_scheduler_defaults_are_valid_for_every_policy(policy):
    c = load_config(None, [f"rollout.scheduler.policy={policy}"])
    assert c.rollout.scheduler.budget_per_worker is None  # engine sized from gpu_memory_utilization


def test_keys_of_the_chosen_policy_are_accepted():
    load_config(None, ["rollout.scheduler.policy=length_aware", "rollout.scheduler.micro_group_size=4",
                       "rollout.scheduler.fptas_eps=0.1", "rollout.scheduler.predictor=constant",
                       "rollout.scheduler.regroup_fraction=0.25", "rollout.scheduler.tail_guard=false"])
    c = load_config(None, ["rollout.scheduler.policy=length_aware", "rollout.scheduler.predictor=egtp",
                           "rollout.scheduler.admission=conservative", "rollout.scheduler.admission_horizon=64"])
    kw = c.rollout.scheduler.worker_options(group_size=8)["policy_kwargs"]
    assert kw["predictor"] == "egtp" and kw["admission"] == "conservative" and kw["admission_horizon"] == 64
    load_config(None, ["rollout.scheduler.policy=continuous", "rollout.scheduler.micro_group_size=2",
                       "rollout.scheduler.slots=8"])


@pytest.mark.parametrize("key, value, message", [
    ("admission", "greedy", "rollout.scheduler.admission = 'greedy' is not valid: use one of optimistic, conservative"),
    ("admission_horizon", 0, "rollout.scheduler.admission_horizon = 0 must be a positive integer"),
    ("predictor", "hidden", "rollout.scheduler.predictor = 'hidden' is not valid: use one of token_conditioned, egtp"),
])
def test_bad_length_aware_settings_name_the_key_and_the_choices(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["rollout.scheduler.policy=length_aware", f"rollout.scheduler.{key}={value}"])


@pytest.mark.parametrize("g", [0, 9, -1])
def test_micro_group_size_must_be_within_the_group(g):
    with pytest.raises(ConfigError, match=rf"micro_group_size = {g} must be in \[1, rollout.group_size = 8\]"):
        load_config(None, ["rollout.group_size=8", "rollout.scheduler.policy=naive_micro",
                           f"rollout.scheduler.micro_group_size={g}"])


def test_kv_budget_auto_is_a_fraction_of_each_workers_full_group_demand():
    c = load_config(None, ["data.prompts_per_step=5", "data.max_prompt_tokens=100", "rollout.workers=2",
                           "rollout.group_size=16", "rollout.max_new_tokens=156",
                           "rollout.scheduler.kv_budget_tokens=auto", "rollout.scheduler.kv_budget_fraction=0.5"])
    # worker 0 gets ceil(5 / 2) = 3 prompts: 0.5 x 3 x 16 x (100 + 156)
    assert c.rollout.scheduler.budget_per_worker == 6144
    assert c.rollout.scheduler.kv_budget_tokens == "auto"  # the config keeps what the user wrote
    assert load_config(None, ["rollout.scheduler.kv_budget_tokens=5000"]).rollout.scheduler.budget_per_worker == 5000


@pytest.mark.parametrize("overrides, match", [
    (["rollout.scheduler.kv_budget_tokens=auto"], "needs rollout.scheduler.kv_budget_fraction"),
    (["rollout.scheduler.kv_budget_fraction=0.5"], "only read with rollout.scheduler.kv_budget_tokens: auto"),
    (["rollout.scheduler.kv_budget_tokens=auto", "rollout.scheduler.kv_budget_fraction=1.5"], r"must be in \(0, 1\]"),
    (["rollout.scheduler.kv_budget_tokens=half"], "kv_budget_tokens = 'half' is not valid"),
    (["rollout.scheduler.kv_budget_tokens=0"], "kv_budget_tokens = 0 is not valid"),
    (["rollout.scheduler.kv_budget_tokens=100", "data.max_prompt_tokens=64", "rollout.max_new_tokens=64"],
     "less than one sequence of data.max_prompt_tokens \\+ rollout.max_new_tokens = 128"),
])
def test_bad_kv_budgets_name_the_field_and_the_fix(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)
