"""`python -m rl.bench async`: the same workload at trainer.max_staleness 0, 1, 2 and auto.

Each setting is a real training run (rl.train's Trainer: vLLM rollout, learner, verified sync)
of --steps steps on the quickstart workload (SmolLM2-135M, 8 prompts x G 8). Reported per
setting: end-to-end completion tokens per second (tokens trained on / wall time of the steps,
the first step left out as warm-up), seconds per step, the idle fractions of the learner and
of the rollout engines (1 - their busy seconds / wall seconds), the staleness reached, and the
reward curve. A PNG and --json are written.

On one machine the two sides share the same cores, so overlap buys little here. The k = 0
run's measured generate, train and sync seconds per step therefore also feed a pipeline model
of a disaggregated layout (rollout and learner on separate hardware, `pipeline_seconds`), which
predicts the speedup of k = 1 and k = 2 there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

SETTINGS = ("0", "1", "2", "auto")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = __doc__
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--steps", type=int, default=6, help="training steps per setting (step 1 is warm-up)")
    p.add_argument("--settings", default=",".join(SETTINGS), help="max_staleness values to run, comma-separated")
    p.add_argument("--out-dir", default="outputs/bench_async")
    p.add_argument("--json", default=None, help="write the results here too")
    p.add_argument("--reuse", action="store_true",
                   help="summarize the runs already in --out-dir (complete metrics.jsonl) instead of training again")
    p.add_argument("overrides", nargs="*", help="extra key=value config overrides")


def pipeline_seconds(generate: list[float], train: list[float], sync: list[float], k: int) -> float:
    """Wall seconds of len(generate) steps when rollout and learner run on separate hardware.

    Batch s (1-based) trains after it is generated and after step s-1's update; its generation
    starts when the engines are free and hold weights of version >= s-1-k (version v is ready
    on the engines when update v is done and synced). k = 0 is the sequential loop.
    """
    n = len(generate)
    gen_done = [0.0] * (n + 1)
    ready = [0.0] * (n + 1)  # ready[v]: weights of version v loaded on the engines
    learner_free = 0.0
    for s in range(1, n + 1):
        need = s - 1 - k
        start = max(gen_done[s - 1], ready[need] if need >= 1 else 0.0)
        gen_done[s] = start + generate[s - 1]
        train_done = max(learner_free, gen_done[s]) + train[s - 1]
        learner_free = train_done
        ready[s] = train_done + sync[s - 1]
    return ready[n]


def _run_setting(args, setting: str) -> dict:
    from rl.config import load_config
    from rl.train import run

    out = Path(args.out_dir) / f"staleness_{setting}"
    metrics = out / "metrics.jsonl"
    wall = None
    if not (args.reuse and metrics.exists() and len(metrics.read_text().splitlines()) >= args.steps):
        config = load_config(args.config, [*args.overrides, f"trainer.max_staleness={setting}",
                                           f"trainer.total_steps={args.steps}", f"trainer.output_dir={out}",
                                           "trainer.checkpoint_every=0"])
        t0 = time.perf_counter()
        run(config)
        wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in metrics.read_text().splitlines()][:args.steps]
    timed = rows[1:] if len(rows) > 1 else rows  # step 1 is warm-up
    step_s = sum(r["time/step"] for r in timed)
    tokens = sum(r["tokens/generated"] for r in timed)
    return {
        "max_staleness": setting, "steps": len(rows), "run_wall_s": wall,
        "seconds_per_step": step_s / len(timed),
        "completion_tokens_per_s": tokens / step_s,
        "learner_idle_fraction": 1 - sum(r["time/train"] for r in timed) / step_s,
        "rollout_idle_fraction": max(0.0, 1 - sum(r["time/generate"] for r in timed) / step_s),
        "staleness_max": max(r.get("staleness/max", 0.0) for r in rows),
        "staleness_k": [r.get("staleness/k") for r in rows],
        "reward_curve": [r["reward/mean"] for r in rows],
        "generate_s": [r["time/generate"] for r in rows],
        "train_s": [r["time/train"] for r in rows],
        "sync_s": [r["time/sync"] for r in rows],
        "ess_fraction": [r.get("behavior/ess_fraction") for r in rows],
    }


def run(args) -> int:
    from rl.bench.table import print_table

    results = [_run_setting(args, s.strip()) for s in args.settings.split(",") if s.strip()]
    base = next((r for r in results if r["max_staleness"] == "0"), results[0])
    gen, train, sync = base["generate_s"][1:], base["train_s"][1:], base["sync_s"][1:]
    sequential = pipeline_seconds(gen, train, sync, 0)
    model = {f"k={k}": {"predicted_seconds": pipeline_seconds(gen, train, sync, k),
                        "predicted_speedup": sequential / pipeline_seconds(gen, train, sync, k)}
             for k in (0, 1, 2)}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"results": results, "pipeline_model": model}
    (out / "bench_async.json").write_text(json.dumps(payload, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=1))
    columns = ["max_staleness", "s/step", "completion tok/s", "learner idle", "rollout idle", "staleness max",
               "reward first", "reward last"]
    print_table([dict(zip(columns, [r["max_staleness"], f"{r['seconds_per_step']:.1f}",
                                    f"{r['completion_tokens_per_s']:.1f}", f"{100 * r['learner_idle_fraction']:.0f}%",
                                    f"{100 * r['rollout_idle_fraction']:.0f}%", f"{r['staleness_max']:.0f}",
                                    f"{r['reward_curve'][0]:.3f}", f"{r['reward_curve'][-1]:.3f}"]))
                 for r in results], columns)
    print("\npipeline model of a disaggregated layout (rollout and learner on separate hardware), from the "
          f"k=0 run's per-step generate {statistics.fmean(gen):.1f} s, train {statistics.fmean(train):.1f} s, "
          f"sync {statistics.fmean(sync):.2f} s:")
    for k, m in model.items():
        print(f"  {k}: {m['predicted_seconds']:.1f} s for {len(gen)} steps, speedup {m['predicted_speedup']:.2f}x")
    _plot(results, out / "bench_async.png")
    print(f"\nwrote {out / 'bench_async.json'} and {out / 'bench_async.png'}")
    return 0


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        ax1.plot(range(1, len(r["reward_curve"]) + 1), r["reward_curve"], marker="o", label=f"k={r['max_staleness']}")
    ax1.set_xlabel("step")
    ax1.set_ylabel("reward/mean")
    ax1.legend()
    names = [f"k={r['max_staleness']}" for r in results]
    ax2.bar(names, [r["completion_tokens_per_s"] for r in results])
    ax2.set_ylabel("completion tokens / s (end to end)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
