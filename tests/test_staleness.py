"""Bounded staleness without Ray: the auto rule, the staleness metrics, and the pipeline model
that rl.bench async uses to predict the speedup of separate rollout and learner hardware."""

import pytest

from rl.bench.overlap import pipeline_seconds
from rl.config import load_config
from rl.errors import ConfigError
from rl.staleness import StalenessControl, staleness_metrics
from rollout.records import Sample


def test_pipeline_model_hand_numbers():
    # generate 2 s, train 3 s, sync 1 s per step, 3 steps.
    # k=0: sequential, 3 x (2 + 3 + 1) = 18 s.
    assert pipeline_seconds([2, 2, 2], [3, 3, 3], [1, 1, 1], 0) == 18
    # k=1: gen1 0-2, train1 2-5, v1 ready 6; gen2 2-4 (needs v0), train2 5-8, v2 ready 9;
    # gen3 needs v1: 6-8, train3 8-11, ready 12.
    assert pipeline_seconds([2, 2, 2], [3, 3, 3], [1, 1, 1], 1) == 12
    # k=2: gen3 needs only v0: 4-6; train3 starts at 8 (learner busy), ends 11, ready 12: the
    # learner is the bottleneck, k=2 gains nothing over k=1 here.
    assert pipeline_seconds([2, 2, 2], [3, 3, 3], [1, 1, 1], 2) == 12
    # rollout-bound: generate 4 s, train 1 s: k=1 hides the training behind generation
    assert pipeline_seconds([4, 4, 4], [1, 1, 1], [0, 0, 0], 0) == 15
    assert pipeline_seconds([4, 4, 4], [1, 1, 1], [0, 0, 0], 1) == 13


def _sample(version):
    return Sample(0, 0, [1], [2], "x", [-1.0], "stop", version)


def test_staleness_metrics():
    m = staleness_metrics([_sample(3), _sample(2), _sample(3)], learner_version=4)
    assert m == {"staleness/mean": pytest.approx(4 / 3), "staleness/max": 2.0}


def test_auto_lowers_k_on_low_ess_and_raises_it_when_the_learner_waits():
    control = StalenessControl(load_config(None, ["trainer.max_staleness=auto", "trainer.auto_staleness_max=2"]).trainer)
    assert control.k == 1
    control.observe({"time/wait_rollout": 3.0, "time/step": 10.0, "behavior/ess_fraction": 0.9})
    assert control.k == 2
    control.observe({"time/wait_rollout": 3.0, "time/step": 10.0, "behavior/ess_fraction": 0.9})
    assert control.k == 2  # capped at auto_staleness_max
    control.observe({"time/wait_rollout": 3.0, "time/step": 10.0, "behavior/ess_fraction": 0.3})
    assert control.k == 1  # weights degenerate: less off-policy, even though the learner waited
    control.observe({"time/wait_rollout": 0.0, "time/step": 10.0, "behavior/ess_fraction": 0.9})
    assert control.k == 1
    fixed = StalenessControl(load_config(None, ["trainer.max_staleness=2"]).trainer)
    fixed.observe({"time/wait_rollout": 9.0, "time/step": 10.0, "behavior/ess_fraction": 0.1})
    assert fixed.k == 2


@pytest.mark.parametrize("value", ["-1", "soon", "1.5"])
def test_bad_max_staleness_names_the_field(value):
    with pytest.raises(ConfigError, match="trainer.max_staleness"):
        load_config(None, [f"trainer.max_staleness={value}"])
