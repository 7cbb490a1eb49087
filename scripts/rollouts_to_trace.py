"""Turn a training run's saved rollouts into length traces, one per step.

A run with `trainer.save_rollouts: true` writes `<output_dir>/rollouts/step_N.jsonl` (one JSON
line per sample: group_id, prompt_ids, response_ids, ...). This writes `<out_dir>/step_NNNN.json`
in the length-trace format of scheduling/traces.py, prompt ids included (the egtp predictor
computes its features from them), for `python -m rl.bench rollout --simulate`:

    python scripts/rollouts_to_trace.py outputs/infinite_sampling configs/traces/train_run
    python -m rl.bench rollout --simulate --lengths configs/traces/train_run/step_0005.json \\
        --warmup-lengths configs/traces/train_run/step_000[1-4].json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scheduling.traces import Trace, save_trace  # noqa: E402


def step_trace(lines: list[dict], max_new_tokens: int, meta: dict) -> Trace:
    """One step's samples -> a Trace; groups keep the step's own group ids."""
    lines = sorted(lines, key=lambda r: (r["group_id"], r["sample_index"]))
    items = [(r["group_id"], len(r["prompt_ids"]), len(r["response_ids"])) for r in lines]
    prompt_ids = {r["group_id"]: tuple(r["prompt_ids"]) for r in lines}
    return Trace(items, max_new_tokens, prompt_ids, meta)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a training run's trainer.output_dir (holds config.yaml and rollouts/)")
    p.add_argument("out_dir", help="where the step_NNNN.json traces go")
    args = p.parse_args(argv)
    run = Path(args.run_dir)
    files = sorted((run / "rollouts").glob("step_*.jsonl"), key=lambda f: int(re.findall(r"\d+", f.name)[0]))
    if not files:
        sys.exit(f"{run / 'rollouts'}: no step_N.jsonl files; run with trainer.save_rollouts=true")
    config = OmegaConf.load(run / "config.yaml")
    cap = int(config.rollout.max_new_tokens)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in files:
        step = int(re.findall(r"\d+", f.name)[0])
        lines = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        meta = {"model": str(config.model.path), "temperature": float(config.rollout.temperature),
                "step": step, "source": str(f)}
        save_trace(out / f"step_{step:04d}.json", step_trace(lines, cap, meta))
    print(f"{len(files)} traces in {out}")


if __name__ == "__main__":
    main()
