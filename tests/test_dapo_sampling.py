"""Driver side of DAPO (dynamic sampling, overlong shaping) and objective hooks, without Ray.

The Trainer's rollout and reward parts are replaced by scripted fakes: each prompt index has
a fixed list of G (reward, response length) pairs, so which groups are dropped is known.
"""

import collections
from types import SimpleNamespace

import pytest

from rewards.combine import RewardResult
from rl.config import load_config
from rl.data import Prompt
from rl.errors import ConfigError
from rl.sampling import StepSampler
from rl.step_metrics import merge_batches
from rl.trainer import Trainer
from rollout.records import RolloutResult, RolloutStats, Sample

G, MAX_NEW = 4, 16
MIXED = [(1.0, 5), (0.0, 5), (0.0, 5), (1.0, 5)]
CONSTANT = [(0.0, 5)] * G


class FakeSource:
    def __init__(self, n):
        self.n, self.next = n, 0

    def state_dict(self):
        return {"next": self.next}

    def next_batch(self):
        out = [Prompt(i, f"p{i}", [i], {"answer": "1"}) for i in range(self.next, self.next + self.n)]
        self.next += self.n
        return out


class FakeRollout:
    """Responses scripted per prompt index (prompt_ids[0]); records the sampling arguments."""

    def __init__(self, script):
        self.script, self.calls, self.processor_metrics = script, [], {}

    def submit(self, requests, **sampling):
        return self.generate(requests, **sampling)

    def wait(self, handle):
        return handle

    def generate(self, requests, **sampling):
        self.calls.append(sampling)
        samples = []
        for req in requests:
            index = req.prompt_ids[0]
            for k, (_, length) in enumerate(self.script(index)):
                samples.append(Sample(req.group_id, k, req.prompt_ids, [7] * length, f"{index}:{k}",
                                      [-1.0] * length, "length" if length == MAX_NEW else "stop"))
        stats = RolloutStats(seconds=1.0, decode_steps=10, peak_running=len(samples))
        return [RolloutResult(samples, stats)]

    def logits_processor_metrics(self):
        return self.processor_metrics


class FakeRewards:
    def __init__(self, script):
        self.script = script

    def score(self, prompts, completions, columns, group):
        rewards = []
        for text in completions:
            index, k = map(int, text.split(":"))
            rewards.append(self.script(index)[k][0])
        return RewardResult(rewards, [True] * len(rewards), {"reward/seconds": 0.5}, failures=[])


def make_trainer(script, overrides, prompts_per_step=2):
    config = load_config(None, [f"data.prompts_per_step={prompts_per_step}", f"rollout.group_size={G}",
                                f"rollout.max_new_tokens={MAX_NEW}", *overrides])
    t = Trainer.__new__(Trainer)  # no actors: only the driver-side logic under test
    t.config = config
    t.setup_objective()
    t.prepared = SimpleNamespace(prompts=FakeSource(prompts_per_step))
    t.rollout, t.rewards = FakeRollout(script), FakeRewards(script)
    t.sampler = StepSampler(config, t.objective, t.prepared.prompts, t.rollout, t.rewards, t.max_response_len)
    t.ahead = collections.deque()
    return t


DAPO = ["objective.name=dapo", "objective.overlong_buffer_len=4", "objective.max_gen_batches=3"]


def test_dynamic_sampling_draws_more_until_enough_groups():
    # prompt 0 constant, 1 mixed | 2 mixed, 3 mixed: two batches, 3 kept, trimmed to 2
    t = make_trainer(lambda i: CONSTANT if i == 0 else MIXED, DAPO)
    batch = t.sample_and_score()
    assert sorted({s.group_id for s in batch.samples}) == [1, 2]
    assert [s.response_text.split(":")[0] for s in batch.samples] == ["1"] * G + ["2"] * G
    assert batch.rewards == [r for r, _ in MIXED] * 2  # length 5 <= 12: no overlong penalty
    m = batch.metrics
    assert m["dynamic_sampling/gen_batches"] == 2
    assert m["dynamic_sampling/kept_groups"] == 3 and m["dynamic_sampling/dropped_groups"] == 1
    assert m["dynamic_sampling/trained_groups"] == 2
    # rollout metrics cover every sample drawn; times and counts add up over the batches
    assert m["rollout/seconds"] == 2.0 and m["rollout/decode_steps"] == 20
    assert m["rollout/peak_running"] == 2 * G and m["reward/seconds"] == 1.0
    assert m["reward/mean"] == pytest.approx((0 + 3 * 0.5 * G) / (4 * G))


def test_dynamic_sampling_is_bounded_by_max_gen_batches():
    t = make_trainer(lambda i: CONSTANT, DAPO)
    batch = t.sample_and_score()
    m = batch.metrics
    assert m["dynamic_sampling/gen_batches"] == 3
    assert m["dynamic_sampling/kept_groups"] == 0 and m["dynamic_sampling/dropped_groups"] == 6
    # nothing to learn from: the last batch trains as it is (zero advantages)
    assert sorted({s.group_id for s in batch.samples}) == [4, 5]


def test_filter_off_and_other_objectives_use_one_batch():
    t = make_trainer(lambda i: CONSTANT, DAPO + ["objective.filter_groups=false"])
    batch = t.sample_and_score()
    assert batch.metrics["dynamic_sampling/gen_batches"] == 1 and len(batch.samples) == 2 * G
    t = make_trainer(lambda i: CONSTANT, ["objective.name=grpo"])
    batch = t.sample_and_score()
    assert t.objective.max_gen_batches == 1 and len(batch.samples) == 2 * G
    assert not any(k.startswith("dynamic_sampling/") for k in batch.metrics)
    assert "reward/shaped_mean" not in batch.metrics


def test_overlong_shaping_changes_rewards_and_rescues_groups():
    # E = 16 - 4 = 12: L=12 -> 0, L=14 -> (12-14)/4 = -0.5, L=16 (truncated) -> -1.
    lengths = [(1.0, 12), (1.0, 14), (1.0, 16), (1.0, 16)]
    t = make_trainer(lambda i: lengths, DAPO)
    batch = t.sample_and_score()
    assert batch.rewards[:G] == [1.0, 0.5, 0.0, 0.0]
    # equal raw rewards, but the shaped ones differ: the groups carry signal and are kept
    assert batch.metrics["dynamic_sampling/gen_batches"] == 1
    assert batch.metrics["reward/mean"] == 1.0
    assert batch.metrics["reward/shaped_mean"] == pytest.approx(0.375)


def test_overlong_buffer_longer_than_responses_is_a_config_error():
    with pytest.raises(ConfigError, match="overlong_buffer_len"):
        make_trainer(lambda i: MIXED, ["objective.name=dapo"])  # default 4096 > 16 tokens


def test_hapo_sends_sampling_args_and_logs_processor_metrics():
    t = make_trainer(lambda i: MIXED, ["objective.name=hapo", "objective.tau=0.1"])
    assert t.objective.rollout_logits_processor == "rollout.hapo_temperature:HAPOTemperatureProcessor"
    t.rollout.processor_metrics = {"hapo/temperature_mean": 1.01}
    batch = t.sample_and_score()
    # first step: no statistics yet, the processor samples at T
    assert t.rollout.calls[0]["extra_args"] == {"hapo_temperature": {"tau": 0.1, "stats": None}}
    assert batch.metrics["hapo/temperature_mean"] == 1.01
    t = make_trainer(lambda i: MIXED, ["objective.name=grpo"])
    t.sample_and_score()
    assert t.objective.rollout_logits_processor is None and t.rollout.calls[0]["extra_args"] is None


def test_merge_batches_rules():
    rows = [{"a/seconds": 1.0, "a/peak_kv_tokens": 5, "a/max": 3, "a/min": 2, "a/mean": 1.0},
            {"a/seconds": 2.0, "a/peak_kv_tokens": 7, "a/max": 1, "a/min": 0, "a/mean": 3.0}]
    assert merge_batches(rows) == {"a/seconds": 3.0, "a/peak_kv_tokens": 7, "a/max": 3, "a/min": 0,
                                    "a/mean": 2.0}
