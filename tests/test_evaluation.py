"""Held-out evaluation without Ray: pass@k, the arithmetic test split, the evaluator's metrics
on scripted samples, and its config errors."""

from types import SimpleNamespace

import pytest

from rewards.combine import RewardResult
from rl.arithmetic_task import arithmetic_examples, is_held_out
from rl.config import load_config
from rl.errors import ConfigError
from rl.evaluation import Evaluator, pass_at_k
from rollout.records import RolloutResult, RolloutStats, Sample


def test_pass_at_k_hand_numbers():
    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 4, 1) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)       # one right in four, one try
    assert pass_at_k(4, 1, 4) == 1.0                        # four tries hold the right one
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)   # 1 - C(3,2)/C(4,2)


def test_test_split_is_held_out_of_training():
    test, train = arithmetic_examples(split="test"), arithmetic_examples()
    assert len(test) > 40 and not {r["prompt"] for r in test} & {r["prompt"] for r in train}
    assert all(is_held_out(*_operands(r["prompt"])) for r in test)


def _operands(prompt):
    a, op, b = prompt.split("?")[0].split()[-3:]
    return int(a), op, int(b)


class _Rollout:
    def generate(self, requests, group_size, **sampling):
        samples = [Sample(r.group_id, k, r.prompt_ids, [1], f"{r.group_id}:{k}", [-1.0], "stop")
                   for r in requests for k in range(group_size)]
        return [RolloutResult(samples, RolloutStats())]


class _Rewards:
    def score(self, prompts, completions, columns, group):
        # prompt 0: all 4 right; prompt 1: one right (k = 0); prompt 2: none
        table = {0: [1.0] * 4, 1: [1.0, 0.0, 0.0, 0.0], 2: [0.0] * 4}
        rewards = [table[int(c.split(":")[0])][int(c.split(":")[1])] for c in completions]
        return RewardResult(rewards, [True] * len(rewards), {}, [])


def test_evaluator_metrics_on_scripted_samples():
    config = load_config(None, ["data.eval_path=builtin:arithmetic", "trainer.eval_every=1",
                                "eval.samples_per_prompt=4", "eval.max_prompts=3"])
    ev = Evaluator.__new__(Evaluator)
    ev.config, ev.rollout, ev.rewards = config, _Rollout(), _Rewards()
    ev.prompts = [SimpleNamespace(text=f"p{i}", token_ids=[i], columns={"answer": "1"}) for i in range(3)]
    m = ev.run()
    assert m["eval/reward_mean"] == pytest.approx(5 / 12)
    assert m["eval/pass@1"] == pytest.approx((1 + 0.25 + 0) / 3)
    assert m["eval/pass@4"] == pytest.approx(2 / 3)
    assert m["eval/prompts"] == 3


def test_eval_every_needs_eval_path():
    with pytest.raises(ConfigError, match="data.eval_path"):
        load_config(None, ["trainer.eval_every=5"])
    with pytest.raises(ConfigError, match="eval.samples_per_prompt"):
        load_config(None, ["eval.samples_per_prompt=0"])
