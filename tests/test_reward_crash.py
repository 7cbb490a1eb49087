"""A reward worker process that dies (os._exit, a segfault, SIGKILL from outside) is one counted
reward failure under reward.on_error, the process is replaced, and the next score() call works
on a full pool of live workers."""

from __future__ import annotations

import os
import signal
import time

import pytest

from rewards import RewardError, RewardExecutor, RewardFunctionConfig, load_reward_functions

CRASHY_SRC = r'''
import ctypes
import os


def crashy(completion):
    if completion == "die":
        os._exit(1)
    if completion == "segv":
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    return 1.0


def crashy_batch(completions, **kwargs):
    if "die" in completions:
        os._exit(1)
    return [1.0] * len(completions)
'''

WORKERS = 2


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("crashy") / "crashy_rewards.py"
    path.write_text(CRASHY_SRC)
    return str(path)


def _executor(reward_file, fn="crashy", **kwargs):
    fns = load_reward_functions([RewardFunctionConfig(path=f"{reward_file}:{fn}")])
    kwargs.setdefault("timeout_s", 30.0)
    return RewardExecutor(fns, num_workers=WORKERS, **kwargs)


def _score(ex, batch):
    return ex.score(["p"] * len(batch), batch, {}, [i // 4 for i in range(len(batch))])


def _assert_pool_live(ex):
    assert len(ex._workers) == WORKERS
    assert all(w.proc.is_alive() for w in ex._workers)


@pytest.mark.parametrize("how, exit_text", [("die", "exit code 1"), ("segv", "SIGSEGV")])
def test_worker_exit_is_a_counted_failure_and_the_pool_recovers(reward_file, how, exit_text):
    batch = ["ok"] * 8
    batch[5] = how
    with _executor(reward_file, on_error="value", error_value=-1.0) as ex:
        t0 = time.monotonic()
        r = _score(ex, batch)
        seconds = time.monotonic() - t0
        assert r.scores["crashy"] == [-1.0 if i == 5 else 1.0 for i in range(8)]
        assert r.valid == [True] * 8
        m = r.metrics
        assert (m["reward/errors"], m["reward/crashy/errors"], m["reward/timeouts"]) == (1.0, 1.0, 0.0)
        assert m["reward/worker_restarts"] == 1.0
        assert len(r.failures) == 1 and exit_text in r.failures[0] and "exited" in r.failures[0]
        assert seconds < 30  # no timeout was waited for: the death is seen at once
        # the next call works, on a full pool of live workers
        r2 = _score(ex, ["ok"] * 8)
        assert r2.rewards == [1.0] * 8 and r2.metrics["reward/errors"] == 0.0
        assert r2.metrics["reward/worker_restarts"] == 0.0
        _assert_pool_live(ex)


def test_skip_group_drops_the_group_of_the_crash(reward_file):
    batch = ["ok"] * 8
    batch[2] = "die"
    with _executor(reward_file, on_error="skip_group") as ex:
        r = _score(ex, batch)
        assert r.valid == [False] * 4 + [True] * 4
        assert r.metrics["reward/errors"] == 1.0 and r.metrics["reward/invalid"] == 4.0
        assert _score(ex, ["ok"] * 4).valid == [True] * 4
        _assert_pool_live(ex)


def test_raise_names_the_function_and_says_it_exited(reward_file):
    with _executor(reward_file, on_error="raise") as ex:
        with pytest.raises(RewardError) as info:
            _score(ex, ["ok", "ok", "ok", "die"])
        msg = str(info.value)
        assert "'crashy'" in msg and "sample 3" in msg and "exited" in msg and "exit code 1" in msg
        assert "reward.on_error" in msg  # the fix
        assert _score(ex, ["ok"] * 4).rewards == [1.0] * 4
        _assert_pool_live(ex)


def test_batch_function_exit_fails_its_whole_chunk(reward_file):
    with _executor(reward_file, fn="crashy_batch", on_error="value", error_value=0.0, chunk_size=2) as ex:
        r = _score(ex, ["ok", "ok", "die", "ok"])
        assert r.scores["crashy_batch"] == [1.0, 1.0, 0.0, 0.0]  # the call got [die, ok]
        assert r.metrics["reward/errors"] == 2.0
        assert _score(ex, ["ok"] * 4).rewards == [1.0] * 4


def test_worker_killed_between_calls_is_replaced(reward_file):
    """A worker that dies while idle (the OOM killer between steps) would break the next send."""
    with _executor(reward_file, on_error="raise") as ex:
        assert _score(ex, ["ok"] * 4).rewards == [1.0] * 4
        deadline = time.monotonic() + 60
        while not all(w.ready for w in ex._workers) and time.monotonic() < deadline:
            for w in ex._workers:
                ex._drain(w)  # its "ready" message (one worker may have done all of the first call)
            time.sleep(0.05)
        for w in ex._workers:
            os.kill(w.proc.pid, signal.SIGKILL)
            w.proc.join(timeout=10)
        r = _score(ex, ["ok"] * 4)
        assert r.rewards == [1.0] * 4 and r.metrics["reward/errors"] == 0.0
        assert r.metrics["reward/worker_restarts"] == float(WORKERS)
        _assert_pool_live(ex)
