"""scripts/rollouts_to_trace.py: a run's saved rollouts become one length trace per step."""

import json
import subprocess
import sys
from pathlib import Path

from scheduling.traces import load_trace

ROOT = Path(__file__).resolve().parents[1]


def _write_run(run: Path) -> None:
    (run / "rollouts").mkdir(parents=True)
    (run / "config.yaml").write_text(
        "model: {path: tiny}\nrollout: {max_new_tokens: 8, temperature: 1.0}\n")
    steps = {1: [(0, 0, [5, 6], 3), (0, 1, [5, 6], 8), (1, 0, [7], 1)],
             10: [(0, 0, [9, 9, 9], 2), (0, 1, [9, 9, 9], 5)]}
    for step, rows in steps.items():
        with (run / "rollouts" / f"step_{step}.jsonl").open("w") as f:
            # written out of order: the trace sorts by (group, sample)
            for g, i, prompt, n in reversed(rows):
                f.write(json.dumps({"group_id": g, "sample_index": i, "prompt_ids": prompt,
                                    "response_ids": list(range(n)), "reward": 0.0}) + "\n")


def test_each_step_becomes_a_trace_with_prompt_ids(tmp_path):
    run, out = tmp_path / "run", tmp_path / "traces"
    _write_run(run)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "rollouts_to_trace.py"), str(run), str(out)],
                   check=True, capture_output=True, text=True)
    assert sorted(p.name for p in out.iterdir()) == ["step_0001.json", "step_0010.json"]
    first = load_trace(out / "step_0001.json")
    assert first.items == [(0, 2, 3), (0, 2, 8), (1, 1, 1)]
    assert first.max_new_tokens == 8
    assert first.prompt_ids == {0: (5, 6), 1: (7,)}
    assert first.meta["step"] == 1
    assert load_trace(out / "step_0010.json").items == [(0, 3, 2), (0, 3, 5)]


def test_a_run_without_saved_rollouts_says_how_to_get_them(tmp_path):
    (tmp_path / "rollouts").mkdir()
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "rollouts_to_trace.py"), str(tmp_path),
                           str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode != 0
    assert "trainer.save_rollouts=true" in done.stderr
