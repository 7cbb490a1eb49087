"""Exact resume: a run stopped by SIGTERM and resumed with trainer.resume_from=auto trains on the
same prompts, samples the same completions and logs the same metrics as the same run done
straight through (float32 on CPU, the synchronous loop).

What makes it exact: the checkpoint holds the optimizer, LR schedule, torch RNG, data
position, Python RNG, the count of generation batches (each rollout reseeds the engine from
(trainer.seed, batch index)) and the engines' admission policies with their length
predictors (which decide the order requests run in, and so which noise each one draws).
"""

from __future__ import annotations

import json
import math
import signal

import pytest

from train_runs import REWARD_FILE, _args, _no_orphans, _rows, _start, _wait_for_step

pytestmark = pytest.mark.slow

TOTAL = 4
# wall-clock measures; the canary check (its continuation is sampled afresh after a resume);
# the engine's KV cache, sized from the memory free when the engine starts
NOT_COMPARED = ("time/", "perf/", "sync/", "eval/seconds", "tokens/generated_per_second",
                "rollout/engine_kv_tokens", "rollout/kv_budget_tokens")


def _completions(run_dir, step):
    lines = (run_dir / "rollouts" / f"step_{step}.jsonl").read_text().splitlines()
    return {(x["group_id"], x["sample_index"]): (x["prompt_ids"], x["response_ids"]) for x in map(json.loads, lines)}


def _differences(a: dict, b: dict) -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        if key.startswith(NOT_COMPARED) or "seconds" in key:
            continue
        x, y = a.get(key), b.get(key)
        if not (isinstance(x, (int, float)) and isinstance(y, (int, float))):
            if x != y:
                out.append(f"{key}: {x} vs {y}")
            continue
        if math.isnan(x) and math.isnan(y):
            continue
        if abs(x - y) > 1e-5 * max(1.0, abs(x)):
            out.append(f"{key}: {x} vs {y}")
    return out


def test_stopped_and_resumed_run_equals_the_straight_run(tmp_path, tiny_model_dir, ray_tmp):
    (tmp_path / "reward.py").write_text(REWARD_FILE)
    common = (f"trainer.total_steps={TOTAL}", "trainer.checkpoint_every=0", "trainer.eval_every=0",
              "trainer.save_rollouts=true", "rollout.max_new_tokens=24")

    straight = _start(_args(tmp_path, tiny_model_dir, *common, f"trainer.output_dir={tmp_path / 'straight'}"),
                      ray_tmp)
    out, err = straight.communicate(timeout=900)
    assert straight.returncode == 0, err[-4000:]

    resumed_dir = tmp_path / "resumed"
    args = _args(tmp_path, tiny_model_dir, *common, f"trainer.output_dir={resumed_dir}")
    first = _start(args, ray_tmp)
    _wait_for_step(first, resumed_dir, 1)
    first.send_signal(signal.SIGTERM)  # finishes the running step, checkpoints it, exits 143
    out, err = first.communicate(timeout=120)
    assert first.returncode == 143, err[-4000:]
    stopped_at = max(r["step"] for r in _rows(resumed_dir))
    assert stopped_at < TOTAL, "the first leg ran to the end: nothing was resumed"
    second = _start(args + ["trainer.resume_from=auto"], ray_tmp)
    out, err = second.communicate(timeout=900)
    assert second.returncode == 0, err[-4000:]
    assert f"resuming from {resumed_dir / 'checkpoints' / f'step_{stopped_at}'}" in err

    a, b = _rows(tmp_path / "straight"), _rows(resumed_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, TOTAL + 1))
    differing = 0
    for step in range(1, TOTAL + 1):
        ca, cb = _completions(tmp_path / "straight", step), _completions(resumed_dir, step)
        assert ca.keys() == cb.keys()
        assert [ca[k][0] for k in sorted(ca)] == [cb[k][0] for k in sorted(cb)], f"step {step}: other prompts"
        differing += sum(ca[k][1] != cb[k][1] for k in ca)
    print(f"stopped after step {stopped_at}, resumed to {TOTAL}: {differing} of "
          f"{sum(len(_completions(resumed_dir, s)) for s in range(1, TOTAL + 1))} completions differ")
    assert differing == 0
    diffs = [f"step {ra['step']}: {d}" for ra, rb in zip(a, b) for d in _differences(ra, rb)]
    assert not diffs, "\n".join(diffs[:20])
    assert not _no_orphans(ray_tmp)
