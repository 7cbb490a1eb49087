"""User mistakes end in one clear paragraph, a non-zero exit, within seconds, before Ray starts.

Each test runs `python -m rl.train` as a user does (a subprocess: interpreter start-up and
imports, seconds each), so the file is marked `slow`.
"""

import json
import os
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow


def run_train(args, cwd):
    # Ray puts its session under $RAY_TMPDIR/ray when it starts: cwd/ray must never appear.
    env = {**os.environ, "RAY_TMPDIR": str(cwd)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "rl.train", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env=env)
    return proc, time.perf_counter() - start


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "solution": "1"}) + "\n" for i in range(8)))
    return path


def _assert_user_error(proc, seconds, cwd, *fragments):
    """Exit 2; stderr is the one paragraph "error: ..." and nothing else; it holds every
    fragment (the field, the value given, the fix); Ray never started."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    message = proc.stderr.strip()
    assert message.startswith("error: ") and "\n\n" not in message, proc.stderr
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert not (cwd / "ray").exists(), "Ray started (its session directory exists)"
    assert seconds < 60


def test_unknown_key(tmp_path):
    proc, s = run_train(["trainer.totl_steps=3"], tmp_path)
    _assert_user_error(proc, s, tmp_path, "Unknown key trainer.totl_steps",
                       "Valid keys of trainer: total_steps, output_dir")


def test_wrong_type(tmp_path):
    proc, s = run_train(["rollout.group_size=many"], tmp_path)
    _assert_user_error(proc, s, tmp_path, "rollout.group_size = 'many'", "expected int, got str")


def test_model_path_missing(tmp_path):
    proc, s = run_train(["model.path=./no/such/model"], tmp_path)
    _assert_user_error(proc, s, tmp_path, "model.path = './no/such/model' does not exist",
                       "demo:SmolLM2-135M-Instruct")


def test_missing_dataset_column(tmp_path, tiny_model_dir, data_file):
    proc, s = run_train([f"model.path={tiny_model_dir}", f"data.path={data_file}"], tmp_path)
    _assert_user_error(proc, s, tmp_path, "data.prompt_key = 'prompt' is not a column",
                       "question, solution", "Set data.prompt_key")


def test_reward_path_that_does_not_import(tmp_path, tiny_model_dir):
    proc, s = run_train([f"model.path={tiny_model_dir}", "reward.functions=[{path: 'no_such_module:fn'}]"], tmp_path)
    _assert_user_error(proc, s, tmp_path, "reward.functions", "'no_such_module:fn'",
                       "'no_such_module' could not be imported", "Fix:")


def test_reward_file_missing_function(tmp_path, tiny_model_dir):
    (tmp_path / "my_reward.py").write_text("def other(prompt, completion, **kw):\n    return 1.0\n")
    proc, s = run_train([f"model.path={tiny_model_dir}", "reward.functions=[{path: 'my_reward.py:score'}]"], tmp_path)
    _assert_user_error(proc, s, tmp_path, "reward.functions", "'my_reward.py:score'",
                       "no attribute 'score'", "['other']")


def test_unknown_objective(tmp_path):
    proc, s = run_train(["objective.name=ppo2"], tmp_path)
    _assert_user_error(proc, s, tmp_path, "objective.name = 'ppo2'", "grpo", "hapo")


def test_missing_config_file(tmp_path):
    proc, s = run_train(["nope.yaml"], tmp_path)
    _assert_user_error(proc, s, tmp_path, "'nope.yaml' does not exist", "configs/quickstart.yaml")


def _hub_reachable() -> bool:
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    try:
        socket.create_connection((urlparse(constants.ENDPOINT).hostname, 443), timeout=3).close()
        return True
    except OSError:
        return False


def test_hub_name_without_network_fails_fast(tmp_path):
    if _hub_reachable():  # checked here, not at collection: no network probe unless it runs
        pytest.skip("the hub is reachable: the name would really download")
    proc, s = run_train(["model.path=SomeOrg/some-model-1b"], tmp_path)
    _assert_user_error(proc, s, tmp_path, "model.path = 'SomeOrg/some-model-1b'", "cannot be reached",
                       "demo:SmolLM2-135M-Instruct")
    assert s < 30
