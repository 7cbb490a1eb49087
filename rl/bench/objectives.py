"""`python -m rl.bench objectives`: every objective for a few steps on the same CPU workload.

Each objective trains --steps steps through the real driver (Ray, vLLM rollout, learner,
verified sync), in this process with one Ray session, from configs/<objective>.yaml (its
paper's defaults at demo scale) or from one --config for all with `objective.name` replaced.
Same seed for every run, so every objective sees the same prompts at step 1 (later steps can
differ: DAPO's dynamic sampling draws extra prompts). Writes to --out-dir:

  objectives.json   command, settings and one row per objective (plus every step's metrics)
  objectives.md     the table: reward at step 1 and at the last step, mean reward, response
                    length, entropy, seconds of step 1 (warm-up) and per later step
  reward_curves.png reward/mean per step, one line per objective

    python -m rl.bench objectives [--steps 6] [--objectives grpo,dapo] [--config C] [key=value ...]
    python -m rl.bench objectives --report-only   # redo the table from the runs in --out-dir

A few steps on a 135M model measure cost per step and that every objective runs; they are far
too few to rank the objectives' learning.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
import traceback
from pathlib import Path

COLUMNS = (  # (key in a row, header, format)
    ("objective", "objective", "{}"),
    ("steps", "steps", "{}"),
    ("reward_first", "reward step 1", "{:.3f}"),
    ("reward_final", "reward last step", "{:.3f}"),
    ("reward_mean", "reward mean", "{:.3f}"),
    ("length_mean", "response length", "{:.1f}"),
    ("entropy_final", "entropy last step", "{:.3f}"),
    ("first_step_seconds", "step 1 s", "{:.1f}"),
    ("seconds_per_step", "s/step after step 1", "{:.1f}"),
    ("gen_batches_mean", "gen. batches/step", "{:.2f}"),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from rl.objectives import OBJECTIVES

    p.add_argument("--objectives", default=",".join(OBJECTIVES),
                   help="comma-separated names (default: every registered objective)")
    p.add_argument("--steps", type=int, default=6, help="training steps per objective")
    p.add_argument("--config", default=None,
                   help="one config for all (objective.name replaced); default configs/<objective>.yaml")
    p.add_argument("--out-dir", default="outputs/bench/objectives")
    p.add_argument("--report-only", action="store_true",
                   help="no training: rebuild the report from <out-dir>/<objective>/metrics.jsonl")
    p.add_argument("overrides", nargs="*", help="config overrides for every run, key=value")


def run(args: argparse.Namespace) -> int:
    from rl.objectives import OBJECTIVES

    names = [n.strip() for n in args.objectives.split(",") if n.strip()]
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        print(f"error: unknown objective(s) {unknown}; valid: {', '.join(OBJECTIVES)}", file=sys.stderr)
        return 2
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Ray starts workers at nice 15, which starves the actors on a shared machine (see
    # rl/bench/step.py); benchmarks run them at nice 0.
    os.environ.setdefault("RAY_worker_niceness", "0")
    rows = []
    for name in names:
        if args.report_only:
            from rl.metrics import read_metrics

            rows.append(summarize(name, args.config or f"configs/{name}.yaml",
                                  read_metrics(out / name / "metrics.jsonl"), None))
            continue
        print(f"== {name}: {args.steps} steps", flush=True)
        rows.append(train_one(name, args.config, args.steps, out / name, list(args.overrides)))
        write_report(out, rows, args)  # after every run: a partial table survives a crash
    write_report(out, rows, args)
    print(markdown_table(rows))
    print(f"wrote {out / 'objectives.json'}, {out / 'objectives.md'}, {out / 'reward_curves.png'}")
    return 0 if all("error" not in r for r in rows) else 1


def train_one(name: str, config: str | None, steps: int, run_dir: Path, overrides: list[str]) -> dict:
    """Train `name` for `steps` steps; one summary row (with its per-step metrics)."""
    from rl.config import load_config
    from rl.metrics import read_metrics
    from rl.train import run as train

    path = config or f"configs/{name}.yaml"
    settings = [*overrides, f"trainer.total_steps={steps}", f"trainer.output_dir={run_dir}",
                "trainer.checkpoint_every=0"]
    if config:
        settings.append(f"objective.name={name}")
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # a fresh run, not appended to an old one
    start = time.perf_counter()
    try:
        train(load_config(path, settings))
    except Exception as e:  # one broken objective must not hide the others' numbers
        traceback.print_exc()
        return {"objective": name, "config": path, "error": f"{type(e).__name__}: {e}"}
    wall = time.perf_counter() - start
    return summarize(name, path, read_metrics(run_dir / "metrics.jsonl"), wall)


def summarize(name: str, config: str, steps: list[dict], wall_seconds: float | None) -> dict:
    """Summary row from the metrics rows of one run. Step 1 carries one-off warm-up costs
    (first forward/backward, allocator growth), so seconds per step average the later steps."""
    def series(key):
        return [r[key] for r in steps if isinstance(r.get(key), (int, float))]

    if not steps:
        return {"objective": name, "config": config, "error": "no metrics (run it without --report-only)"}

    step_seconds = series("time/step")
    later = step_seconds[1:] or step_seconds
    row = {
        "objective": name, "config": config, "steps": len(steps),
        "reward_first": series("reward/mean")[0], "reward_final": series("reward/mean")[-1],
        "reward_mean": statistics.fmean(series("reward/mean")),
        "length_mean": statistics.fmean(series("response_length/mean")),
        "entropy_final": series("entropy")[-1],
        "first_step_seconds": step_seconds[0], "seconds_per_step": statistics.fmean(later),
        "startup_seconds": wall_seconds - sum(step_seconds) if wall_seconds is not None else None,
        "gen_batches_mean": statistics.fmean(series("dynamic_sampling/gen_batches") or [1.0]),
        "metrics": steps,
    }
    return row


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |",
             "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['objective']} | failed: {r['error'][:80]} |" + " |" * (len(COLUMNS) - 2))
            continue
        lines.append("| " + " | ".join(fmt.format(r[k]) for k, _, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def write_report(out: Path, rows: list[dict], args: argparse.Namespace) -> None:
    path = out / "objectives.json"
    if args.report_only and path.exists():  # keep the command of the run that trained
        previous = json.loads(path.read_text())
        startup = {r["objective"]: r.get("startup_seconds") for r in previous.get("rows", [])}
        for r in rows:
            if r.get("startup_seconds") is None and "error" not in r:
                r["startup_seconds"] = startup.get(r["objective"])
        path.write_text(json.dumps({**previous, "rows": rows}, indent=1))
    else:
        command = "python -m rl.bench objectives " + " ".join(
            shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["objectives"] else None
        path.write_text(json.dumps(
            {"command": command, "steps": args.steps, "config": args.config or "configs/<objective>.yaml",
             "overrides": list(args.overrides), "rows": rows}, indent=1))
    (out / "objectives.md").write_text(markdown_table(rows) + "\n")
    plot_rewards(rows, out / "reward_curves.png")


def plot_rewards(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        points = [(m["step"], m["reward/mean"]) for m in r.get("metrics", []) if "reward/mean" in m]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, label=r["objective"])
    ax.set_xlabel("step")
    ax.set_ylabel("reward/mean (before shaping)")
    ax.set_title("reward per step, same workload and seed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
