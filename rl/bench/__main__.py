"""`python -m rl.bench {rollout,step,sync,trl,objectives,rewards,async} ...`

Each subcommand lives in its own module `rl.bench.<name>` with `add_arguments(parser)` and
`run(args) -> int`; this file only dispatches.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "rollout": "Infinite Sampling policies on a length trace (--simulate) or on real vLLM",
    "step": "one full GRPO step: phase split, tokens/s, learner padding",
    "sync": "weight sync seconds and GB/s next to memcpy bandwidth",
    "trl": "the same workload through TRL's GRPOTrainer, side by side",
    "objectives": "every objective for a few steps on the CPU demo: final reward, length, entropy, s/step",
    "rewards": "the reward executor's own overhead per sample (trivial rewards through the process pool)",
    "async": "the same workload at trainer.max_staleness 0, 1, 2 and auto; a pipeline model of separate hardware",
}
# Subcommands whose module name differs (`async` is a Python keyword).
MODULES = {"async": "overlap"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rl.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, help_text in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        modules[name] = importlib.import_module(f"rl.bench.{MODULES.get(name, name)}")
        modules[name].add_arguments(p)
    args = parser.parse_args(argv)
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
