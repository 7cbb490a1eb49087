"""trainer.loggers: jsonl always on, tensorboard, and the optional wandb / mlflow extras.

wandb and mlflow are not project dependencies (extra `trackers`): their tests skip cleanly
where they are not installed (CI installs the project's own dependencies only). They run
offline: WANDB_MODE=offline, and an MLflow file store inside output_dir.
"""

import importlib.util
import json

import pytest

from rl.config import load_config
from rl.errors import ConfigError
from rl.metrics import MetricsLogger, check_loggers, read_metrics


def test_loggers_default_and_jsonl_always_on():
    assert load_config(None, []).trainer.loggers == ["jsonl", "tensorboard"]
    assert load_config(None, ["trainer.loggers=[tensorboard]"]).trainer.loggers == ["jsonl", "tensorboard"]
    assert load_config(None, ["trainer.loggers=[]"]).trainer.loggers == ["jsonl"]
    assert check_loggers(["TensorBoard", "jsonl", "tensorboard"]) == ["jsonl", "tensorboard"]


def test_unknown_logger_names_field_value_and_fix():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["trainer.loggers=[jsonl,comet]"])
    msg = str(e.value)
    assert "trainer.loggers" in msg and "'comet'" in msg and "wandb" in msg and "mlflow" in msg


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_missing_tracker_is_a_config_error_with_the_install_command(tracker, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == tracker else real(name, *a))
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"trainer.loggers=[jsonl,{tracker}]"])
    msg = str(e.value)
    assert f"'{tracker}'" in msg and "not installed" in msg
    assert "pip install 'rl-infinite[trackers]'" in msg and f"pip install {tracker}" in msg


def test_missing_tracker_stops_the_cli_before_ray(monkeypatch, capsys):
    """The check is part of loading the config, so `python -m rl.train` fails at once (exit 2)."""
    from rl import train

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    monkeypatch.setattr(train, "init_ray", lambda c: pytest.fail("Ray must not start"))
    assert train.main(["trainer.loggers=[wandb]"]) == 2
    assert "pip install" in capsys.readouterr().err


def test_jsonl_only_writes_no_tensorboard(tmp_path):
    log = MetricsLogger(tmp_path, loggers=["jsonl"], plot=False)
    log.log(1, {"reward/mean": 0.5})
    log.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "reward/mean": 0.5}]
    assert not (tmp_path / "tensorboard").exists()


def test_log_eval_rows_and_resume_truncation(tmp_path):
    log = MetricsLogger(tmp_path, loggers=["jsonl", "tensorboard"], plot=False)
    for step in (5, 10, 15):
        log.log(step, {"reward/mean": step / 10})
        log.log_eval(step, {"accuracy": step / 100, "eval/pass@1": 0.5})
    log.truncate_after(10)
    log.log_eval(15, {"accuracy": 0.9})
    log.close()
    rows = read_metrics(tmp_path / "eval.jsonl")
    assert rows == [{"step": 5, "accuracy": 0.05, "eval/pass@1": 0.5}, {"step": 10, "accuracy": 0.1, "eval/pass@1": 0.5},
                    {"step": 15, "accuracy": 0.9}]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [5, 10]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert {"eval/accuracy", "eval/pass@1", "reward/mean"} <= set(acc.Tags()["scalars"])


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = MetricsLogger(tmp_path, loggers=["jsonl", "wandb"], run_name="tiny", plot=False,
                        config={"objective": {"name": "grpo"}, "learner": {"lr": 1e-5}})
    log.log(1, {"reward/mean": 0.25, "loss": 0.5})
    log.log(2, {"reward/mean": 0.75, "loss": 0.25})
    log.log_eval(2, {"accuracy": 0.5})
    log.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = next(runs[0].glob("run-*.wandb")).read_bytes()
    # the history rows (keys and values as JSON) and the config are in the run's record file
    for needle in (b"reward/mean", b"eval/accuracy", b"0.75", b"grpo", b"tiny"):
        assert needle in records, needle
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 2


def test_mlflow_file_store_in_output_dir(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    log = MetricsLogger(tmp_path, loggers=["mlflow"], run_name="tiny", plot=False,
                        config={"objective": {"name": "grpo"}, "reward": {"functions": [{"path": "arithmetic"}]}})
    log.log(1, {"reward/mean": 0.25, "clip_ratio/low": 0.0})
    log.log(2, {"reward/mean": 0.75, "note": "not a number"})
    log.log_eval(2, {"accuracy": 0.5})
    run_id = log.mlflow_run.info.run_id
    log.close()
    store = tmp_path / "mlruns"
    assert store.is_dir()
    client = mlflow.MlflowClient(tracking_uri=store.resolve().as_uri())
    run = client.get_run(run_id)
    assert run.info.run_name == "tiny"
    assert run.data.params["objective.name"] == "grpo"
    assert json.loads(run.data.params["reward.functions"]) == [{"path": "arithmetic"}]
    history = client.get_metric_history(run_id, "reward/mean")
    assert [(m.step, m.value) for m in history] == [(1, 0.25), (2, 0.75)]
    assert [m.value for m in client.get_metric_history(run_id, "eval/accuracy")] == [0.5]
