"""metrics.jsonl rows, TensorBoard events, curves.png, and resume truncation."""

import json

from rl.metrics import MetricsLogger, read_metrics


def test_logger_writes_jsonl_tensorboard_and_png(tmp_path):
    log = MetricsLogger(tmp_path)
    for step in range(1, 4):
        log.log(step, {"reward/mean": 0.1 * step, "response_length/mean": 10.0 + step, "loss": -0.5,
                       "time/step": 1.0})
    log.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[2]["reward/mean"] == 0.30000000000000004 or abs(rows[2]["reward/mean"] - 0.3) < 1e-12
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100


def test_truncate_after_drops_later_steps(tmp_path):
    log = MetricsLogger(tmp_path, plot=False)
    for step in range(1, 6):
        log.log(step, {"reward/mean": float(step)})
    log.truncate_after(3)
    log.log(4, {"reward/mean": 40.0})
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["reward/mean"] == 40.0
