"""Benchmarks: `python -m rl.bench SUBCOMMAND --help`. Each writes JSON and a PNG and prints a table."""
