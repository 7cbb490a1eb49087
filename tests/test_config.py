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
