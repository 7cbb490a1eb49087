"""`python -m rl.bench rewards`: the reward executor's own overhead per sample.

Scores N trivial rewards (a plain per-sample function and a TRL batch function that return a
constant) through the process pool; what is measured is the executor's own cost (pickling,
pipes, dispatch, combination). Start-up of the workers is reported separately: it happens once.

    python -m rl.bench rewards                          # 1,024 samples, 2 workers, median of 10
    python -m rl.bench rewards --completion-chars 40000 # pickling long texts
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

# The workers import the rewards by these paths, so the functions must stay module-level here.
FUNCTIONS = (("plain (per-sample)", "rl.bench.rewards:trivial_plain"),
             ("trl (batch)", "rl.bench.rewards:trivial_trl"))


def trivial_plain(prompt: str, completion: str) -> float:
    """Per-sample reward that does no work."""
    return 1.0


def trivial_trl(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """Batch reward that does no work."""
    return [1.0] * len(completions)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--completion-chars", type=int, default=2000)
    p.add_argument("--out-dir", default="outputs/bench/rewards")


def run(args: argparse.Namespace) -> int:
    from rewards import RewardExecutor, load_reward_functions

    n = args.samples
    prompts = ["What is 6 * 7?"] * n
    # distinct strings: pickle would send one shared object only once
    completions = [f"{i} " + "x" * args.completion_chars for i in range(n)]
    columns = {"answer": ["42"] * n}
    group = [i // 8 for i in range(n)]
    rows = []
    for label, path in FUNCTIONS:
        fns = load_reward_functions([{"path": path}])
        t0 = time.perf_counter()
        with RewardExecutor(fns, num_workers=args.workers) as ex:
            ex.score(prompts[:1], completions[:1], {"answer": ["42"]}, [0])  # waits for start-up
            startup = time.perf_counter() - t0
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                result = ex.score(prompts, completions, columns, group)
                times.append(time.perf_counter() - t)
        if len(result.rewards) != n:
            raise RuntimeError(f"{path}: {len(result.rewards)} rewards for {n} samples")
        row = {"function": label, "samples": n, "workers": args.workers, "repeats": args.repeats,
               "completion_chars": args.completion_chars,
               "median_ms_per_sample": statistics.median(times) * 1000 / n,
               "best_ms_per_sample": min(times) * 1000 / n, "startup_s": startup}
        rows.append(row)
        print(f"{label:20s} {n} samples, {args.workers} workers: {row['median_ms_per_sample']:.4f} "
              f"ms/sample (median of {args.repeats}; best {row['best_ms_per_sample']:.4f}); "
              f"worker start-up {startup:.2f} s")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rewards.json").write_text(json.dumps({"rows": rows}, indent=1))
    return 0
