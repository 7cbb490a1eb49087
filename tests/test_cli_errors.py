"""User mistakes end in one clear paragraph, a non-zero exit, within seconds, before Ray starts."""

import json
import subprocess
import sys
import time

import pytest


def run_train(args, cwd):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "rl.train", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)
    return proc, time.perf_counter() - start


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "solution": "1"}) + "\n" for i in range(8)))
    return path


def _assert_user_error(proc, seconds, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr
    assert "ray" not in proc.stderr.lower() or "ray." in proc.stderr  # Ray never started
    assert seconds < 60


def test_unknown_key(tmp_path):
    proc, s = run_train(["trainer.totl_steps=3"], tmp_path)
    _assert_user_error(proc, s, "trainer.totl_steps", "total_steps", "output_dir")


def test_wrong_type(tmp_path):
    proc, s = run_train(["rollout.group_size=many"], tmp_path)
    _assert_user_error(proc, s, "rollout.group_size = 'many'", "expected int")


def test_model_path_missing(tmp_path):
    proc, s = run_train(["model.path=./no/such/model"], tmp_path)
    _assert_user_error(proc, s, "model.path = './no/such/model' does not exist")


def test_missing_dataset_column(tmp_path, tiny_model_dir, data_file):
    proc, s = run_train([f"model.path={tiny_model_dir}", f"data.path={data_file}"], tmp_path)
    _assert_user_error(proc, s, "data.prompt_key = 'prompt'", "question, solution")


def test_reward_path_that_does_not_import(tmp_path, tiny_model_dir):
    proc, s = run_train([f"model.path={tiny_model_dir}", "reward.functions=[{path: 'no_such_module:fn'}]"], tmp_path)
    _assert_user_error(proc, s, "reward.functions", "no_such_module")


def test_reward_file_missing_function(tmp_path, tiny_model_dir):
    (tmp_path / "my_reward.py").write_text("def other(prompt, completion, **kw):\n    return 1.0\n")
    proc, s = run_train([f"model.path={tiny_model_dir}", "reward.functions=[{path: 'my_reward.py:score'}]"], tmp_path)
    _assert_user_error(proc, s, "score", "other")


def test_unknown_objective(tmp_path):
    proc, s = run_train(["objective.name=ppo2"], tmp_path)
    _assert_user_error(proc, s, "ppo2", "grpo", "hapo")


def test_missing_config_file(tmp_path):
    proc, s = run_train(["nope.yaml"], tmp_path)
    _assert_user_error(proc, s, "nope.yaml", "does not exist")


def _hub_reachable() -> bool:
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    try:
        socket.create_connection((urlparse(constants.ENDPOINT).hostname, 443), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(_hub_reachable(), reason="the hub is reachable: the name would really download")
def test_hub_name_without_network_fails_fast(tmp_path):
    proc, s = run_train(["model.path=SomeOrg/some-model-1b"], tmp_path)
    _assert_user_error(proc, s, "SomeOrg/some-model-1b", "cannot be reached")
    assert s < 30
