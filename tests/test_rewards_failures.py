"""Failures inside reward functions: exceptions, timeouts, dying workers, bad return values.
The step always completes (or raises a RewardError that says what failed), and every failure
is counted."""

from __future__ import annotations

import time

import pytest

from rewards import RewardError, RewardExecutor, RewardFunctionConfig, load_reward_functions

FLAKY_SRC = r'''
import asyncio
import ctypes
import os
import time


def flaky(completion):
    if completion == "raise":
        raise ValueError("boom")
    if completion == "sleep":
        time.sleep(60)
    if completion == "exit":
        os._exit(3)
    if completion == "segv":
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    if completion == "bad":
        return "not a number"
    if completion == "nan":
        return float("nan")
    return 1.0


def steady(completion):
    return 0.5


async def async_sleepy(completion):
    if completion == "sleep":
        await asyncio.sleep(60)
    return 1.0


def trl_sleepy(completions, **kwargs):
    if "sleep" in completions:
        time.sleep(60)
    return [1.0] * len(completions)
'''

TIMEOUT_S = 1.0
# groups of 4 (group id = i // 4): group 3 is the only clean one
BATCH = ["ok", "raise", "ok", "ok",
         "ok", "sleep", "ok", "ok",
         "ok", "exit", "ok", "ok",
         "ok", "ok", "ok", "ok",
         "segv", "ok", "ok", "ok"]
GROUP = [i // 4 for i in range(len(BATCH))]


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("flaky") / "flaky_rewards.py"
    path.write_text(FLAKY_SRC)
    return str(path)


def _load(reward_file, *fns):
    return load_reward_functions([RewardFunctionConfig(path=f"{reward_file}:{fn}") for fn in fns])


def _score(ex, batch):
    return ex.score(["p"] * len(batch), batch, {}, [i // 4 for i in range(len(batch))])


def test_on_error_value_counts_everything(reward_file):
    with RewardExecutor(_load(reward_file, "flaky", "steady"), timeout_s=TIMEOUT_S, on_error="value",
                        error_value=-1.0, num_workers=2) as ex:
        t0 = time.monotonic()
        r = _score(ex, BATCH)
        # the 60 s sleep was cut at its 1 s timeout (bound is loose: 2 shared cores)
        assert time.monotonic() - t0 < 30
        failed = {1, 5, 9, 16}
        assert r.scores["flaky"] == [-1.0 if i in failed else 1.0 for i in range(len(BATCH))]
        assert r.rewards == [-0.5 if i in failed else 1.5 for i in range(len(BATCH))]
        assert r.valid == [True] * len(BATCH)
        m = r.metrics
        assert (m["reward/flaky/errors"], m["reward/flaky/timeouts"]) == (3.0, 1.0)  # raise, exit, segv; sleep
        assert (m["reward/errors"], m["reward/timeouts"]) == (3.0, 1.0)
        assert m["reward/steady/errors"] == 0.0
        assert m["reward/flaky/mean"] == 1.0  # error_value substitutes are not real scores
        assert m["reward/worker_restarts"] == 3.0  # sleep (killed), exit, segv
        assert len(r.failures) == 4
        text = "\n".join(r.failures)
        assert "ValueError: boom" in text and "SIGSEGV" in text and "exit code 3" in text
        # the replaced workers serve the next step normally
        r2 = _score(ex, ["ok"] * 8)
        assert r2.rewards == [1.5] * 8 and r2.metrics["reward/errors"] == 0.0


def test_on_error_skip_group(reward_file):
    with RewardExecutor(_load(reward_file, "flaky", "steady"), timeout_s=TIMEOUT_S, on_error="skip_group",
                        num_workers=2) as ex:
        r = _score(ex, BATCH)
    assert r.valid == [g == 3 for g in GROUP]
    assert [x for x, v in zip(r.rewards, r.valid) if v] == [1.5] * 4
    assert r.metrics["reward/invalid"] == 16.0
    assert (r.metrics["reward/errors"], r.metrics["reward/timeouts"]) == (3.0, 1.0)


def test_on_error_raise_names_function_sample_and_message(reward_file):
    with RewardExecutor(_load(reward_file, "flaky"), timeout_s=TIMEOUT_S, on_error="raise", num_workers=2) as ex:
        with pytest.raises(RewardError, match=r"'flaky' failed on sample 2: ValueError: boom"):
            _score(ex, ["ok", "ok", "raise", "ok"])
        with pytest.raises(RewardError, match=r"'flaky' timed out on sample 1"):
            _score(ex, ["ok", "sleep"])
        with pytest.raises(RewardError) as info:
            _score(ex, ["ok", "ok", "bad"])
        msg = str(info.value)
        assert "'flaky'" in msg and "sample 2" in msg and "'not a number'" in msg
        with pytest.raises(RewardError, match=r"sample 0: .*non-finite reward nan"):
            _score(ex, ["nan"])
        with pytest.raises(RewardError, match=r"sample 1: worker process died \(exit code 3\)"):
            _score(ex, ["ok", "exit"])
        # the executor is still usable after raising
        assert _score(ex, ["ok"] * 4).rewards == [1.0] * 4


def test_async_and_batch_timeouts(reward_file):
    fns = _load(reward_file, "async_sleepy", "trl_sleepy")
    with RewardExecutor(fns, timeout_s=TIMEOUT_S, on_error="value", error_value=0.0, num_workers=2,
                        chunk_size=2) as ex:
        r = _score(ex, ["ok", "ok", "sleep", "ok"])
    # async: only the sleeping call times out (asyncio.wait_for inside the worker)
    assert r.scores["async_sleepy"] == [1.0, 1.0, 0.0, 1.0]
    assert r.metrics["reward/async_sleepy/timeouts"] == 1.0
    # batch (TRL): one call per chunk of 2, so the sleeping call's whole chunk times out
    assert r.scores["trl_sleepy"] == [1.0, 1.0, 0.0, 0.0]
    assert r.metrics["reward/trl_sleepy/timeouts"] == 2.0


def test_batch_function_wrong_length_is_an_error(tmp_path):
    path = tmp_path / "short.py"
    path.write_text("def short(completions, **kwargs):\n    return [1.0]\n")
    with RewardExecutor(load_reward_functions([RewardFunctionConfig(path=f"{path}:short")]), on_error="raise",
                        num_workers=0) as ex:
        with pytest.raises(RewardError, match=r"'short' failed on sample 0: returned \[1.0\] for a chunk of 2"):
            ex.score(["p", "p"], ["a", "b"], {}, [0, 0])
