"""The "add an objective in one file" example of docs/OBJECTIVES.md runs as written."""

import re
from pathlib import Path

import pytest
import torch

DOC = Path(__file__).parent.parent / "docs" / "OBJECTIVES.md"


def test_documented_objective_registers_and_trains():
    from rl.config import load_config
    from rl.objectives import OBJECTIVES, get_objective
    from rl.objectives.registry import _REGISTRY

    code = re.search(r"## Add an objective in one file.*?```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    _REGISTRY.pop("scaled_grpo", None)
    try:
        exec(compile(code, str(DOC), "exec"), {"__name__": "doc_example"})
        assert "scaled_grpo" in OBJECTIVES
        # the config loader validates its hyperparameters like any other objective's
        assert load_config(None, ["objective.name=scaled_grpo", "objective.reward_scale=3"]).objective.params == \
            {"reward_scale": 3.0}
        obj = get_objective("scaled_grpo", reward_scale=2.0)
        mask = torch.ones(4, 2, dtype=torch.bool)
        adv = obj.advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.zeros(4, dtype=torch.long), mask)
        # scaling rewards does not change a std-normalized advantage: GRPO's worked numbers
        assert adv[:, 0].tolist() == pytest.approx([0.866024, -0.866024, -0.866024, 0.866024], abs=1e-5)
        # the hooks it did not override are the declared no-op defaults
        assert obj.rollout_logits_processor is None and not obj.uses_dynamic_sampling and obj.max_gen_batches == 1
        lp = torch.full((4, 2), -1.0, requires_grad=True)
        loss, metrics = obj.loss(lp, torch.full((4, 2), -1.2), adv, mask)
        loss.backward()
        assert lp.grad is not None and "clip_ratio" in metrics
    finally:
        _REGISTRY.pop("scaled_grpo", None)
