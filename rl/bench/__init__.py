"""Benchmarks: `python -m rl.bench SUBCOMMAND --help`, one subcommand per question.

Each prints a table and writes JSON (all but `rewards` also a PNG; `rollout` where --json
points). The figures they measured, with the commands, are in docs/BENCHMARKS.md.
"""
