"""Measure the executor's overhead per sample: `python -m rewards.bench_overhead`.

Scores N trivial rewards (a plain per-sample function and a TRL batch function that return a
constant) through the process pool; what is measured is the executor's own cost (pickling,
pipes, dispatch, combination). Start-up of the workers is reported separately: it happens once.
"""

from __future__ import annotations

import argparse
import statistics
import time


def trivial_plain(prompt: str, completion: str) -> float:
    """Per-sample reward that does no work."""
    return 1.0


def trivial_trl(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """Batch reward that does no work."""
    return [1.0] * len(completions)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--completion-chars", type=int, default=2000)
    args = ap.parse_args()

    from rewards import RewardExecutor, RewardSpec, load_reward_functions

    n = args.samples
    prompts = ["What is 6 * 7?"] * n
    # distinct strings: pickle would send one shared object only once
    completions = [f"{i} " + "x" * args.completion_chars for i in range(n)]
    columns = {"answer": ["42"] * n}
    group = [i // 8 for i in range(n)]
    for label, path in [("plain (per-sample)", "rewards.bench_overhead:trivial_plain"),
                        ("trl (batch)", "rewards.bench_overhead:trivial_trl")]:
        fns = load_reward_functions([RewardSpec(path=path)])
        t0 = time.perf_counter()
        with RewardExecutor(fns, num_workers=args.workers) as ex:
            ex.score(prompts[:1], completions[:1], {"answer": ["42"]}, [0])  # waits for start-up
            startup = time.perf_counter() - t0
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                ex.score(prompts, completions, columns, group)
                times.append(time.perf_counter() - t)
        ms = statistics.median(times) * 1000 / n
        print(f"{label:20s} {n} samples, {args.workers} workers: {ms:.4f} ms/sample "
              f"(median of {args.repeats}; best {min(times) * 1000 / n:.4f}); worker start-up {startup:.2f} s")


if __name__ == "__main__":
    main()
