"""`python -m rl.train` on the tiny model as a user runs it, for the tests that stop, kill or
resume it (tests/test_preemption.py, tests/test_faults.py, tests/test_exact_resume.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

REWARD_FILE = '''
def variety(prompt, completion, answer=None, **kwargs):
    return len(set(completion)) / 10.0
'''


def _args(tmp_path, model_dir, *overrides):
    """tests/test_e2e_train.py's tiny run."""
    return ["configs/quickstart.yaml", f"model.path={model_dir}", "model.dtype=float32",
            "data.prompts_per_step=3", "data.max_prompt_tokens=64",
            "rollout.group_size=4", "rollout.max_new_tokens=12", "rollout.gpu_memory_utilization=0.05",
            f"reward.functions=[{{path: '{tmp_path / 'reward.py'}:variety'}}]", "reward.workers=1",
            "learner.lr=1e-3", "learner.micro_batch_tokens=512",
            f"trainer.output_dir={tmp_path / 'run'}", *overrides]


def _rows(run_dir):
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _processes_of(ray_tmp: Path) -> list:
    """Every process of ours whose environment carries this run's RAY_TMPDIR (the driver, Ray's
    GCS and raylet, the actors and anything they started), besides this test process."""
    psutil = pytest.importorskip("psutil")
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.pid == os.getpid():
            continue
        try:
            if p.environ().get("RAY_TMPDIR") == str(ray_tmp):
                found.append(f"{p.pid} {' '.join(p.info['cmdline'] or [])[:120]}")
        except (psutil.Error, OSError):
            continue
    return found


def _start(args, ray_tmp):
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "rl.train", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc, run_dir, step, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r["step"] >= step for r in _rows(run_dir)):
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run exited ({proc.returncode}) before step {step}:\n{err[-4000:]}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"no step {step} within {timeout} s")


def _no_orphans(ray_tmp, within=20.0):
    deadline = time.monotonic() + within
    left = _processes_of(ray_tmp)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = _processes_of(ray_tmp)
    return left


