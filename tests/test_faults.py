"""Fault injection: actors killed or stopped during a real run (`python -m rl.train`, tiny model,
real Ray and vLLM). Each test asserts that the run finishes with every step logged once, every
step's samples present once, and the fault counted.

The faults come from the tests (signals sent to the processes placement.json names, a reward
function that sends one), never from the run's config.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from train_runs import REWARD_FILE, _args, _no_orphans, _rows, _start, _wait_for_step

pytestmark = pytest.mark.slow

TOTAL = 4
PROMPTS, GROUP = 3, 4


def _run_args(tmp_path, model_dir, *overrides):
    return _args(tmp_path, model_dir, f"trainer.total_steps={TOTAL}", "trainer.eval_every=0",
                 "trainer.save_rollouts=true", "rollout.max_new_tokens=48", *overrides)


def _pid(run_dir, role: str, rank: int = 0) -> int:
    return int(json.loads((run_dir / "placement.json").read_text())[role][rank]["pid"])


def _finish(proc, timeout=900):
    try:
        out, err = proc.communicate(timeout=timeout)
    except Exception:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the run did not finish within {timeout} s:\n{err[-4000:]}")
    assert proc.returncode == 0, err[-6000:]
    text = out + err  # the step lines and recovery reports are on stdout, Ray's on stderr
    print("\n".join(line for line in text.splitlines() if " lost: " in line or "replaced" in line or "rebuil" in line))
    return text


def _assert_complete(run_dir):
    """Every step once in metrics.jsonl, and each step's samples exactly once: every
    (prompt, sample) pair of the step, none twice."""
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, TOTAL + 1)), [r["step"] for r in rows]
    for step in range(1, TOTAL + 1):
        lines = [json.loads(x) for x in (run_dir / "rollouts" / f"step_{step}.jsonl").read_text().splitlines()]
        keys = [(x["group_id"], x["sample_index"]) for x in lines]
        assert sorted(keys) == [(g, k) for g in range(PROMPTS) for k in range(GROUP)], (step, keys)
    return rows


def test_rollout_actor_killed_during_generation_is_replaced(tmp_path, tiny_model_dir, ray_tmp):
    (tmp_path / "reward.py").write_text(REWARD_FILE)
    run_dir = tmp_path / "run"
    proc = _start(_run_args(tmp_path, tiny_model_dir), ray_tmp)
    _wait_for_step(proc, run_dir, 1)  # step 2's rollout starts right after step 1's row
    pid = _pid(run_dir, "rollout")
    time.sleep(0.3)
    os.kill(pid, signal.SIGKILL)
    err = _finish(proc)
    rows = _assert_complete(run_dir)
    assert rows[-1]["faults/rollout_restarts"] == 1.0
    assert rows[-1]["faults/learner_restarts"] == 0.0
    assert f"rollout worker 0 (pid {pid} on node" in err and "lost: died during generate" in err, err[-4000:]
    assert "replaced (pid" in err
    assert _pid(run_dir, "rollout") != pid  # placement.json names the replacement
    # the replacement was synced and checked: every later sync check passed
    assert all(r["sync/max_logprob_diff"] < 1e-3 for r in rows)
    assert not _no_orphans(ray_tmp)


KILLING_REWARD = '''
import os, signal, time, json
from pathlib import Path

RUN = Path({run_dir!r})
MARK = RUN.parent / "killed"


def variety(prompt, completion, answer=None, **kwargs):
    calls = RUN.parent / "calls"
    n = int(calls.read_text()) + 1 if calls.exists() else 1
    calls.write_text(str(n))
    if n == {kill_at_call} and not MARK.exists():
        pid = json.loads((RUN / "placement.json").read_text())["rollout"][0]["pid"]
        MARK.write_text(str(pid))
        os.kill(pid, signal.SIGKILL)
        time.sleep(1.0)  # dead before the trainer's next call to it: the weight sync
    return len(set(completion)) / 10.0
'''


def test_rollout_actor_killed_before_the_sync_is_replaced_in_the_sync(tmp_path, tiny_model_dir, ray_tmp):
    """The rollout actor dies after its step-2 rollout (killed from inside the reward
    function); the trainer meets the dead actor in that step's weight sync."""
    run_dir = tmp_path / "run"
    # one reward call per sample (the executor's batches are per group or smaller; count samples)
    (tmp_path / "reward.py").write_text(KILLING_REWARD.format(run_dir=str(run_dir), kill_at_call=PROMPTS * GROUP + 1))
    proc = _start(_run_args(tmp_path, tiny_model_dir), ray_tmp)
    err = _finish(proc)
    pid = int((tmp_path / "killed").read_text())
    rows = _assert_complete(run_dir)
    assert rows[-1]["faults/rollout_restarts"] == 1.0
    assert f"rollout worker 0 (pid {pid} on node" in err and "died during load_weights" in err, err[-4000:]
    assert all(r["sync/max_logprob_diff"] < 1e-3 for r in rows)
    assert not _no_orphans(ray_tmp)


def test_learner_killed_rebuilds_from_the_checkpoint(tmp_path, tiny_model_dir, ray_tmp):
    (tmp_path / "reward.py").write_text(REWARD_FILE)
    run_dir = tmp_path / "run"
    proc = _start(_run_args(tmp_path, tiny_model_dir, "trainer.checkpoint_every=2"), ray_tmp)
    _wait_for_step(proc, run_dir, 3)  # checkpoint step_2 exists; step 4 is running
    pid = _pid(run_dir, "learner")
    os.kill(pid, signal.SIGKILL)
    err = _finish(proc)
    rows = _assert_complete(run_dir)
    assert rows[-1]["faults/learner_restarts"] == 1.0
    assert "learner actor 0 lost: died" in err, err[-4000:]
    assert f"rebuilding the learners from checkpoint {run_dir / 'checkpoints' / 'step_2'}" in err, err[-4000:]
    assert "learners rebuilt at step 2" in err
    assert _pid(run_dir, "learner") != pid
    assert not _no_orphans(ray_tmp)


def test_stopped_engine_is_detected_and_replaced(tmp_path, tiny_model_dir, ray_tmp):
    """SIGSTOP: the process exists but answers nothing. The liveness probe times out after
    trainer.actor_timeout_s, the actor is killed and replaced."""
    (tmp_path / "reward.py").write_text(REWARD_FILE)
    run_dir = tmp_path / "run"
    proc = _start(_run_args(tmp_path, tiny_model_dir, "trainer.actor_timeout_s=5"), ray_tmp)
    _wait_for_step(proc, run_dir, 1)
    pid = _pid(run_dir, "rollout")
    time.sleep(0.3)
    t0 = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    err = _finish(proc)
    rows = _assert_complete(run_dir)
    assert rows[-1]["faults/rollout_restarts"] == 1.0
    assert "hung or stopped; killed" in err, err[-4000:]
    print(f"SIGSTOP -> run finished {time.monotonic() - t0:.1f} s later")
    assert not _no_orphans(ray_tmp)


def test_stopped_learner_is_detected_and_rebuilt(tmp_path, tiny_model_dir, ray_tmp):
    """SIGSTOP of the learner: its `ping` (served on the actor's control thread) goes unanswered
    for trainer.actor_timeout_s, the learner is killed and the learners rebuilt from step_2."""
    (tmp_path / "reward.py").write_text(REWARD_FILE)
    run_dir = tmp_path / "run"
    proc = _start(_run_args(tmp_path, tiny_model_dir, "trainer.checkpoint_every=2", "trainer.actor_timeout_s=5"),
                  ray_tmp)
    _wait_for_step(proc, run_dir, 3)
    pid = _pid(run_dir, "learner")
    t0 = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    err = _finish(proc)
    rows = _assert_complete(run_dir)
    assert rows[-1]["faults/learner_restarts"] == 1.0
    assert "learner actor 0 lost: no answer to a liveness probe for 5 s" in err, err[-4000:]
    assert "hung or stopped; killed" in err
    assert f"rebuilding the learners from checkpoint {run_dir / 'checkpoints' / 'step_2'}" in err, err[-4000:]
    assert _pid(run_dir, "learner") != pid
    print(f"learner SIGSTOP -> run finished {time.monotonic() - t0:.1f} s later")
    assert not _no_orphans(ray_tmp)


def test_restarts_past_the_limit_stop_with_the_resume_command(tmp_path, tiny_model_dir, ray_tmp):
    (tmp_path / "reward.py").write_text(REWARD_FILE)
    run_dir = tmp_path / "run"
    proc = _start(_run_args(tmp_path, tiny_model_dir, "trainer.max_restarts=0"), ray_tmp)
    _wait_for_step(proc, run_dir, 1)
    os.kill(_pid(run_dir, "rollout"), signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-4000:]
    assert "lost: died" in out + err
    assert "trainer.max_restarts = 0" in err and "trainer.resume_from=auto" in err, err[-4000:]
    assert "Traceback" not in err, err[-4000:]
    assert not _no_orphans(ray_tmp)


def test_learner_killed_in_the_middle_of_a_checkpoint_save(tmp_path, tiny_model_dir, ray_tmp):
    """Learner rank 0 dies while step 2's checkpoint is being written (its .step_2.tmp exists):
    the half-written directory never counts as a checkpoint; the learners are rebuilt from the
    run's start (no complete checkpoint yet), steps 1-2 run again and are saved whole."""
    from rl.checkpoints import complete_checkpoints

    (tmp_path / "reward.py").write_text(REWARD_FILE)
    run_dir = tmp_path / "run"
    proc = _start(_run_args(tmp_path, tiny_model_dir, "trainer.checkpoint_every=2"), ray_tmp)
    tmp_dir = run_dir / "checkpoints" / ".step_2.tmp"
    deadline = time.monotonic() + 600
    while not tmp_dir.exists():  # the driver makes it just before the learner writes into it
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint save of step 2 seen"
        time.sleep(0.001)
    os.kill(_pid(run_dir, "learner"), signal.SIGKILL)
    err = _finish(proc)
    rows = _assert_complete(run_dir)
    assert rows[-1]["faults/learner_restarts"] == 1.0
    assert "learner actor 0 lost: died during save_checkpoint" in err, err[-4000:]
    assert "rebuilding the learners from the run's start (no checkpoint yet)" in err
    assert [step for step, _ in complete_checkpoints(run_dir)] == [2, 4]
    assert not list((run_dir / "checkpoints").glob(".step_*"))
    assert not _no_orphans(ray_tmp)


EXITING_REWARD = '''
import os
from pathlib import Path

MARK = Path({mark!r})


def variety(prompt, completion, answer=None, **kwargs):
    calls = MARK.parent / "calls"
    n = int(calls.read_text()) + 1 if calls.exists() else 1
    calls.write_text(str(n))
    if n == {exit_at_call} and not MARK.exists():
        MARK.write_text("exited")
        os._exit(1)  # the reward worker process dies inside the user's function
    return len(set(completion)) / 10.0
'''


def test_reward_process_that_exits_is_a_counted_failure(tmp_path, tiny_model_dir, ray_tmp):
    run_dir = tmp_path / "run"
    (tmp_path / "reward.py").write_text(EXITING_REWARD.format(mark=str(tmp_path / "exited"),
                                                              exit_at_call=PROMPTS * GROUP + 3))
    proc = _start(_run_args(tmp_path, tiny_model_dir, "reward.on_error=value"), ray_tmp)
    _finish(proc)
    rows = _assert_complete(run_dir)
    assert (tmp_path / "exited").exists()
    assert rows[1]["reward/errors"] == 1.0 and rows[1]["reward/worker_restarts"] == 1.0, rows[1]
    assert sum(r["reward/errors"] for r in rows) == 1.0
    assert not _no_orphans(ray_tmp)
