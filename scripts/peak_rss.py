"""Run a command and report the peak resident memory of each process whose command line
contains a pattern (e.g. Ray's `ray::RolloutActor`), sampled every 0.5 s with psutil.

    python scripts/peak_rss.py --match RolloutActor -- python -m rl.train configs/infinite_sampling.yaml

Used for the RSS columns of docs/BENCHMARKS.md ("In a training run").
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import psutil


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--match", action="append", required=True, help="substring of a process's command line")
    p.add_argument("--interval", type=float, default=0.5)
    p.add_argument("--timeline", help="also write 'seconds pattern rss_bytes' lines here, every sample")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    child = subprocess.Popen(cmd)
    peak: dict[str, int] = {}
    start = time.monotonic()
    timeline = open(args.timeline, "w") if args.timeline else None
    while child.poll() is None:
        for proc in psutil.process_iter(["pid", "cmdline"]):
            line = " ".join(proc.info["cmdline"] or [])
            for pattern in args.match:
                if pattern in line:
                    try:
                        rss = proc.memory_info().rss
                    except psutil.Error:
                        continue
                    peak[pattern] = max(peak.get(pattern, 0), rss)
                    if timeline:
                        timeline.write(f"{time.monotonic() - start:.1f} {pattern} {rss}\n")
        time.sleep(args.interval)
    if timeline:
        timeline.close()
    for pattern in args.match:
        print(f"peak RSS [{pattern}]: {peak.get(pattern, 0) / 2**30:.2f} GiB", flush=True)
    return child.returncode


if __name__ == "__main__":
    sys.exit(main())
