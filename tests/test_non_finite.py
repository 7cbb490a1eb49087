"""Non-finite guard: a step with a NaN loss is not applied (weights, AdamW state and LR schedule
unchanged, with one optimizer step and with several), it is counted, and the driver stops after
trainer.max_skipped_steps in a row."""

import math
from types import SimpleNamespace

import pytest
import torch

from rl.batches import ScoredBatch, ScoredGroup, make_train_shards
from rl.config import load_config
from rl.errors import TrainingError
from rollout.records import Sample


def _batch(nan: bool) -> ScoredBatch:
    groups = []
    for g in range(2):
        samples = [Sample(g, k, [3 + g, 4, 5], [6 + k, 7, 8 + g], "x", [-1.0] * 3, "stop") for k in range(2)]
        rewards = [float("nan") if nan else 1.0, 0.0]
        groups.append(ScoredGroup(samples, rewards, [True, True]))
    return ScoredBatch(groups, {}, [])


def _state(learner):
    update = learner.updater
    return ([p.detach().clone() for p in update.params], update.scheduler.state_dict()["last_epoch"],
            {k: {n: t.clone() for n, t in v.items()} for k, v in update.optimizer.state_dict()["state"].items()})


@pytest.mark.parametrize("extra", [[], ["learner.ppo_epochs=2", "learner.mini_batches=2", "data.prompts_per_step=2"]])
def test_nan_step_is_not_applied(tiny_model_dir, make_learner, extra):
    overrides = ["model.dtype=float32", "learner.lr=1e-2", "learner.behavior_correction.mode=none", *extra]
    learner = make_learner(tiny_model_dir, *overrides)
    c = load_config(None, overrides)
    good, _ = make_train_shards(learner.objective, _batch(False), 1, 16, mini_batches=c.learner.mini_batches)
    metrics, _ = learner.update(good[0])  # a finite step first, so AdamW has state to protect
    assert metrics["faults/skipped_step"] == 0.0
    before = _state(learner)
    bad, _ = make_train_shards(learner.objective, _batch(True), 1, 16, mini_batches=c.learner.mini_batches)
    metrics, _ = learner.update(bad[0])
    assert metrics["faults/skipped_step"] == 1.0 and not math.isfinite(metrics["loss"])
    after = _state(learner)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))  # weights
    assert before[1] == after[1]  # LR schedule position
    for k in before[2]:
        assert all(torch.equal(before[2][k][n], after[2][k][n]) for n in before[2][k])  # AdamW moments
    metrics, _ = learner.update(good[0])  # and training goes on
    assert metrics["faults/skipped_step"] == 0.0 and math.isfinite(metrics["loss"])


def test_driver_counts_skips_writes_samples_and_stops(tmp_path):
    from rl.trainer import Trainer

    t = Trainer.__new__(Trainer)
    t.config = load_config(None, ["trainer.max_skipped_steps=2"])
    t.out, t.skipped_steps, t.skipped_in_a_row = tmp_path, 0, 0
    batch = _batch(True)
    m = {"faults/skipped_step": 1.0, "loss": float("nan")}
    t.guard_non_finite(3, batch, m)
    assert m["faults/skipped_steps"] == 1.0
    rows = (tmp_path / "bad_steps" / "step_3.jsonl").read_text().splitlines()
    assert len(rows) == 4 and '"response_ids": [6, 7, 8]' in rows[0]
    m = {"faults/skipped_step": 0.0}
    t.guard_non_finite(4, batch, m)  # a good step resets the run of skips
    assert m["faults/skipped_steps"] == 1.0 and t.skipped_in_a_row == 0
    t.guard_non_finite(5, batch, {"faults/skipped_step": 1.0})
    with pytest.raises(TrainingError, match="2 steps in a row.*resume_from=auto"):
        t.guard_non_finite(6, batch, {"faults/skipped_step": 1.0})
