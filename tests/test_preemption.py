"""SIGTERM / SIGINT: the driver finishes the running step, checkpoints it, shuts Ray down and
exits 128 + signal with the resume command; `trainer.resume_from=auto` continues the run.

The unit tests drive rl/preemption.py in this process (signals sent to ourselves); the slow
ones run `python -m rl.train` on the tiny model as a user does and stop it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from rl import preemption
from rl.preemption import STOP, Preempted, at_step_end, handle_signals
from train_runs import REWARD_FILE, _args, _no_orphans, _rows, _start, _wait_for_step

REPO = Path(__file__).resolve().parent.parent


class FakeTrainer:
    def __init__(self, out):
        self.out = Path(out)
        self.saved = []

    def save_checkpoint(self, step):
        self.saved.append(step)
        self.last_saved_step = step
        return self.out / "checkpoints" / f"step_{step}"


def _signal_self(signum):
    os.kill(os.getpid(), signum)
    time.sleep(0.01)  # Python runs the handler at the next bytecode of the main thread


def test_in_the_step_loop_a_signal_waits_for_the_step_end(tmp_path):
    trainer = FakeTrainer(tmp_path)
    with handle_signals() as stop:
        with pytest.raises(Preempted) as info, stop.deferred():
            at_step_end(trainer, 1)  # nothing requested: goes on
            _signal_self(signal.SIGTERM)  # mid-step 2: only a flag
            assert stop.requested and trainer.saved == []
            at_step_end(trainer, 2)
    e = info.value
    assert (e.step, e.exit_code, trainer.saved) == (2, 143, [2])
    assert e.checkpoint == str(tmp_path / "checkpoints" / "step_2")


def test_a_step_that_already_saved_is_not_saved_twice(tmp_path):
    trainer = FakeTrainer(tmp_path)
    with handle_signals() as stop, pytest.raises(Preempted) as info, stop.deferred():
        trainer.save_checkpoint(3)  # checkpoint_every hit this step
        _signal_self(signal.SIGINT)
        at_step_end(trainer, 3)
    assert (info.value.step, info.value.exit_code, trainer.saved) == (3, 130, [3])


def test_outside_the_step_loop_a_signal_stops_at_once():
    with handle_signals(), pytest.raises(Preempted) as info:
        _signal_self(signal.SIGTERM)
        time.sleep(5)  # preflight, actors starting...
    assert info.value.step is None and info.value.exit_code == 143


def test_a_step_past_the_grace_period_is_abandoned(tmp_path):
    """A step that does not finish within grace_s of the signal: Preempted is raised inside it
    (the watchdog interrupts the main thread); no checkpoint of the unfinished step."""
    trainer = FakeTrainer(tmp_path)
    with handle_signals() as stop:
        stop.grace_s = 0.5
        t0 = time.monotonic()
        with pytest.raises(Preempted) as info, stop.deferred():
            _signal_self(signal.SIGTERM)
            for _ in range(100):  # a long step
                time.sleep(0.1)
            at_step_end(trainer, 1)
    assert info.value.abandoned_step and info.value.step is None and trainer.saved == []
    assert time.monotonic() - t0 < 5


def test_a_stop_raised_inside_a_finalizer_is_raised_again_outside_it(capfd):
    """The handler can run inside a __del__ or weakref callback (seen in CI: logging's
    _releaseLock, a WeakKeyDictionary callback), where Python prints "Exception ignored" and
    drops the exception. The stop must still come out, once, in ordinary code, silently."""

    class SignalsWhenCollected:
        def __del__(self):
            _signal_self(signal.SIGTERM)

    with handle_signals(), pytest.raises(Preempted) as info:
        obj = SignalsWhenCollected()
        del obj  # the handler raises inside __del__: dropped there, then raised again
        for _ in range(100):
            time.sleep(0.01)
    assert info.value.exit_code == 143 and STOP.swallowed is None
    assert "Exception ignored" not in capfd.readouterr().err


def test_other_unraisable_exceptions_still_reach_the_previous_hook():
    seen = []
    before = sys.unraisablehook
    sys.unraisablehook = seen.append
    try:
        with handle_signals():
            class Broken:
                def __del__(self):
                    raise ValueError("from __del__")
            Broken()
        assert [type(u.exc_value) for u in seen] == [ValueError]
    finally:
        sys.unraisablehook = before
    assert sys.unraisablehook is before


def test_ray_init_cannot_replace_our_sigterm_handler():
    from ray._private import utils as ray_utils

    original = ray_utils.set_sigterm_handler
    with handle_signals(), preemption.keep_handlers_through_ray_init():
        ray_utils.set_sigterm_handler(lambda signum, frame: None)  # what ray.init does
        assert signal.getsignal(signal.SIGTERM) is preemption._handler
    assert ray_utils.set_sigterm_handler is original


def test_handlers_are_restored_after():
    before = {s: signal.getsignal(s) for s in preemption.SIGNALS}
    with handle_signals():
        assert signal.getsignal(signal.SIGTERM) is preemption._handler
    assert {s: signal.getsignal(s) for s in preemption.SIGNALS} == before


def test_second_signal_exits_at_once():
    code = ("import os, signal, time\n"
            "from rl.preemption import handle_signals\n"
            "with handle_signals() as stop, stop.deferred():\n"
            "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.2)\n"
            "    os.kill(os.getpid(), signal.SIGINT); time.sleep(30)\n")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130 and time.monotonic() - t0 < 20
    assert "SIGINT again: exiting now" in proc.stderr and "Traceback" not in proc.stderr


def test_resume_command_keeps_the_arguments_and_asks_for_auto():
    argv = ["configs/quickstart.yaml", "trainer.total_steps=40", "trainer.resume_from=/x/step_2",
            "reward.functions=[{path: 'r.py:f'}]"]
    assert preemption.resume_command(argv) == (
        "python -m rl.train configs/quickstart.yaml trainer.total_steps=40 "
        "'reward.functions=[{path: '\"'\"'r.py:f'\"'\"'}]' trainer.resume_from=auto")


# --- python -m rl.train, stopped for real -----------------------------------------------------

@pytest.mark.slow
def test_sigterm_checkpoints_the_last_step_and_auto_resume_finishes(tmp_path, tiny_model_dir, ray_tmp):
    from rl.checkpoints import check_checkpoint, newest_complete_checkpoint

    (tmp_path / "reward.py").write_text(REWARD_FILE)
    total = 8
    args = _args(tmp_path, tiny_model_dir, f"trainer.total_steps={total}", "trainer.checkpoint_every=0")
    run_dir = tmp_path / "run"
    proc = _start(args, ray_tmp)
    _wait_for_step(proc, run_dir, 1)
    t_signal = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"still running 90 s after SIGTERM:\n{err[-4000:]}")
    stop_s = time.monotonic() - t_signal
    print(f"SIGTERM -> exit: {stop_s:.1f} s")
    assert proc.returncode == 143, err[-4000:]
    assert stop_s < 60, stop_s
    assert "trainer.resume_from=auto" in err and "python -m rl.train" in err
    assert "Traceback" not in err and "*** SIG" not in err and "Stack trace" not in err, err[-4000:]
    last = max(r["step"] for r in _rows(run_dir))
    assert last < total  # it stopped early
    newest = newest_complete_checkpoint(run_dir)
    assert newest == run_dir / "checkpoints" / f"step_{last}", (newest, last)  # the last completed step
    assert check_checkpoint(newest)["step"] == last
    assert f"after step {last} of {total}" in err
    assert not list((run_dir / "checkpoints").glob(".step_*"))
    left = _no_orphans(ray_tmp)
    assert not left, f"processes of the stopped run still alive: {left}"

    # the printed command, as a user reruns it
    proc = _start(args + ["trainer.resume_from=auto"], ray_tmp)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-4000:]
    assert f"trainer.resume_from=auto: resuming from {newest}" in err
    assert [r["step"] for r in _rows(run_dir)] == list(range(1, total + 1))  # every step, once
    assert newest_complete_checkpoint(run_dir) == run_dir / "checkpoints" / f"step_{total}"
    assert not _no_orphans(ray_tmp)


@pytest.mark.slow
def test_second_sigint_exits_at_once_and_leaves_no_ray_process(tmp_path, tiny_model_dir, ray_tmp):
    """Ctrl-C twice (to the whole process group, as a terminal sends it): the second exits
    at once; Ray's processes die with the driver (fate sharing), the reward worker on EOF."""
    (tmp_path / "reward.py").write_text(REWARD_FILE)
    args = _args(tmp_path, tiny_model_dir, "trainer.total_steps=50", "trainer.checkpoint_every=0")
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rl.train", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    _wait_for_step(proc, tmp_path / "run", 1)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.5)
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-4000:]
    assert time.monotonic() - t0 < 10
    assert "SIGINT again: exiting now" in err
    left = _no_orphans(ray_tmp, within=30)
    assert not left, f"processes still alive after the forced exit: {left}"


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 3.0], ids=["in_ray_init", "actors_starting"])
def test_sigterm_before_the_first_step_stops_cleanly(tmp_path, tiny_model_dir, ray_tmp, delay):
    """Before the first step (ray.init starting the GCS and raylet, or vLLM and the learner
    loading): nothing to save; the driver stops at once, inside whatever Ray call it waits in,
    with our message (not ray.init's own SIGTERM handler's silent exit 15), and leaves no process."""
    (tmp_path / "reward.py").write_text(REWARD_FILE)
    proc = _start(_args(tmp_path, tiny_model_dir, "trainer.total_steps=50"), ray_tmp)
    deadline = time.monotonic() + 300
    while not list((ray_tmp / "ray").glob("session_*")) and time.monotonic() < deadline:
        assert proc.poll() is None
        time.sleep(0.05)
    time.sleep(delay)
    assert not _rows(tmp_path / "run"), "too late: a step already finished"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 143, err[-4000:]
    assert "Stopped by SIGTERM" in err and "trainer.resume_from=auto" in err
    assert "Traceback" not in err and "SystemError" not in err, err[-4000:]
    left = _no_orphans(ray_tmp)
    assert not left, f"processes of the stopped run still alive: {left}"


@pytest.mark.slow
def test_resume_from_an_incomplete_checkpoint_fails_before_ray(tmp_path, ray_tmp):
    broken = tmp_path / "run" / "checkpoints" / "step_3"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{}")
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
    proc = subprocess.run([sys.executable, "-m", "rl.train", f"trainer.output_dir={tmp_path / 'run'}",
                           f"trainer.resume_from={broken}"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    msg = proc.stderr.strip()
    assert msg.startswith("error: trainer.resume_from = ") and str(broken) in msg
    assert "not a complete checkpoint" in msg and "trainer.resume_from=auto" in msg
    assert "Traceback" not in msg
    assert not list(ray_tmp.iterdir()), "Ray started"


@pytest.mark.slow
def test_a_step_past_the_grace_period_is_abandoned_cleanly(tmp_path, tiny_model_dir, ray_tmp):
    """RL_STOP_GRACE_S=0: the running step is abandoned at once, inside whatever Ray call the
    driver is waiting in; the run still exits 143 with the resume command, no traceback, no
    process left, and the newest complete checkpoint is one of a finished step."""
    from rl.checkpoints import newest_complete_checkpoint

    (tmp_path / "reward.py").write_text(REWARD_FILE)
    args = _args(tmp_path, tiny_model_dir, "trainer.total_steps=50", "trainer.checkpoint_every=1")
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "PYTHONUNBUFFERED": "1", "RL_STOP_GRACE_S": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "rl.train", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    run_dir = tmp_path / "run"
    _wait_for_step(proc, run_dir, 1)
    time.sleep(1.0)  # into step 2
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 143, err[-4000:]
    assert "abandoning it" in err and "trainer.resume_from=auto" in err
    assert "Traceback" not in err and "SystemError" not in err, err[-4000:]
    newest = newest_complete_checkpoint(run_dir)
    assert newest is not None and f"newest complete checkpoint: {newest}" in err
    left = _no_orphans(ray_tmp)
    assert not left, f"processes of the stopped run still alive: {left}"
