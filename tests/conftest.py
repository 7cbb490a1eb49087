"""Shared fixtures: tiny models built on the fly (no hub, seconds)."""

import faulthandler
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

import pytest

# One test may not take the whole CI budget: a test that runs longer than this fails with every
# thread's stack (a hang in Ray or a collective then names itself). Slow tests run real training
# jobs and engines; the longest takes a few minutes here.
TEST_TIMEOUT_S = {"slow": int(os.environ.get("RL_SLOW_TEST_TIMEOUT_S", 900)),
                  "fast": int(os.environ.get("RL_FAST_TEST_TIMEOUT_S", 120))}


class TestTimedOut(Exception):
    pass


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    limit = TEST_TIMEOUT_S["slow" if item.get_closest_marker("slow") else "fast"]

    def on_alarm(signum, frame):
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        raise TestTimedOut(f"{item.nodeid} ran past {limit} s (RL_SLOW_TEST_TIMEOUT_S / "
                           f"RL_FAST_TEST_TIMEOUT_S); the stacks of all threads are above")

    def last_resort():  # the alarm is raised between bytecodes; a call blocked in C never sees it
        item.config.pluginmanager.getplugin("capturemanager").suspend_global_capture(in_=False)
        faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)
        print(f"\n{item.nodeid} ran past {limit} s and did not stop on the alarm: ending pytest",
              file=sys.__stderr__, flush=True)
        os._exit(3)

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(limit)
    watchdog = threading.Timer(limit + 60, last_resort)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield
    finally:
        watchdog.cancel()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random 2-layer Qwen2 with tied embeddings and a BPE tokenizer with a chat template."""
    from rl.tiny_model import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny_tied"), tie_word_embeddings=True))


@pytest.fixture(scope="session")
def tiny_untied_model_dir(tmp_path_factory):
    """The same with a separate lm_head (Llama architecture, to cover a second model family)."""
    from rl.tiny_model import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny_untied"), tie_word_embeddings=False, arch="llama"))


@pytest.fixture(scope="session")
def make_learner():
    """A factory: Learner(model_path, "key=value" config overrides..., **Learner kwargs).

    Builds the learner from the config sections exactly as rl.actors.LearnerGroup does.
    """
    import dataclasses

    def build(model_path, *overrides, **kwargs):
        from rl.config import load_config
        from rl.learner import Learner

        c = load_config(None, list(overrides))
        kwargs.setdefault("num_threads", 1)
        return Learner(dataclasses.replace(c.model, path=str(model_path)), c.learner, c.objective,
                       temperature=c.rollout.temperature, seed=c.trainer.seed, **kwargs)

    return build


@pytest.fixture
def ray_tmp():
    # short: Ray's socket paths under it must stay below the 107-byte limit of AF_UNIX
    path = Path(tempfile.mkdtemp(prefix="rlp", dir="/tmp"))
    yield path
    import shutil

    shutil.rmtree(path, ignore_errors=True)
