"""Simulation benchmark: every policy on one length trace, measures side by side.

    python -m scheduling.bench --synthetic lognormal --prompts 64 --group-size 16 --slots 32
    python -m scheduling.bench --lengths trace.json --json out.json
    python -m scheduling.bench --fptas          # FPTAS timing on 4,096 sequences
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from typing import Sequence

import numpy as np

from .base import make_policy
from .knapsack import fptas_knapsack
from .predictors import LengthPredictor, OracleLengthPredictor, make_predictor
from .simulator import simulate
from .traces import Trace, load_trace, synthetic_trace

PREDICTOR_POLICIES = {"length_aware"}  # policies that take a `predictor=` argument


def warm_predictor(predictor: LengthPredictor, traces: Sequence[Trace]) -> LengthPredictor:
    """Let `predictor` observe every sample of earlier rollouts (earlier training steps)."""
    for tr in traces:
        predictor.begin_rollout()
        for s, n in zip(tr.to_seqs(), tr.lengths):
            predictor.observe(s, n)
    return predictor


def simulate_policies(
    trace: Trace,
    policies: Sequence[str] = ("full_group", "naive_micro", "continuous", "length_aware"),
    slots: int = 32,
    kv_budget_tokens: int | None = None,
    predictor: str | LengthPredictor = "oracle",
    plan_every_step: bool = False,
) -> list[dict]:
    """One row of measures per policy. `predictor` is a name ("oracle" is built from the trace)
    or an instance, deep-copied per policy so every policy starts from the same state.
    kv_budget_tokens None: see `default_kv_budget`."""
    trace = Trace.coerce(trace)
    if kv_budget_tokens is None:
        kv_budget_tokens = default_kv_budget(trace, slots)
    rows, full_peak = [], None
    for name in policies:
        kw = {}
        if name in PREDICTOR_POLICIES:
            if isinstance(predictor, str) and predictor == "oracle":
                kw["predictor"] = OracleLengthPredictor(dict(enumerate(trace.lengths)))
            elif isinstance(predictor, str):
                kw["predictor"] = make_predictor(predictor)
            else:
                kw["predictor"] = copy.deepcopy(predictor)
        res = simulate(make_policy(name, **kw), trace, slots, kv_budget_tokens, plan_every_step)
        row = res.as_dict()
        row["predictor"] = kw["predictor"].name if kw else "-"
        row["kv_budget_tokens"] = kv_budget_tokens
        if name == "full_group":
            full_peak = res.peak_kv_tokens
        rows.append(row)
    for row in rows:
        row["peak_kv_vs_full"] = row["peak_kv_tokens"] / full_peak if full_peak else float("nan")
    return rows


def default_kv_budget(trace: Trace, slots: int) -> int:
    """slots x (mean prompt + max_new_tokens): an engine sized so that `slots` sequences of full
    length fit, i.e. the slot count, not the KV, is the binding limit (as vLLM's max_num_seqs
    with enough KV). Pass a smaller budget to study the KV-bound regime."""
    prompts = float(np.mean([p for _, p, _ in trace.items]))
    return int(slots * (prompts + trace.max_new_tokens))


def format_table(rows: Sequence[dict]) -> str:
    """Plain-text table of the main measures."""
    cols = [
        ("policy", "policy", "{}"),
        ("predictor", "predictor", "{}"),
        ("decode_steps", "steps", "{}"),
        ("lower_bound", "bound", "{}"),
        ("steps_over_bound", "steps/bound", "{:.3f}"),
        ("peak_kv_tokens", "peak_kv", "{}"),
        ("peak_kv_vs_full", "kv/full", "{:.3f}"),
        ("peak_concurrency", "peak_conc", "{}"),
        ("mean_concurrency", "mean_conc", "{:.1f}"),
        ("kv_over_budget_steps", "over_budget", "{}"),
        ("overhead_s", "sched_s", "{:.3f}"),
    ]
    cells = [[h for _, h, _ in cols]] + [[f.format(r[k]) for k, _, f in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def time_fptas(n: int = 4096, eps: float = 0.05, capacity_fraction: float = 0.25,
               seed: int = 0, repeats: int = 5) -> dict:
    """Best and median wall time of one FPTAS call on n predicted sequences (value = predicted
    length, weight = prompt + predicted length, capacity = fraction of the total weight)."""
    rng = np.random.default_rng(seed)
    length = np.clip(np.rint(rng.lognormal(np.log(128), 1.0, n)), 1, 4096)
    weight = rng.integers(16, 320, n) + length
    cap = capacity_fraction * weight.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        chosen = fptas_knapsack(length, weight, cap, eps)
        times.append(time.perf_counter() - t0)
    return {"n": n, "eps": eps, "capacity_fraction": capacity_fraction, "chosen": len(chosen),
            "best_ms": 1e3 * min(times), "median_ms": 1e3 * float(np.median(times))}


def main(argv: Sequence[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m scheduling.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synthetic", choices=["lognormal", "pareto"], default="lognormal")
    ap.add_argument("--lengths", help="JSON length trace (scheduling/traces.py format)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--group-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--kv-budget", type=int, default=None, help="default: slots x (mean prompt + max_new_tokens)")
    ap.add_argument("--predictor", default="oracle,token_conditioned",
                    help="comma-separated predictor names for length_aware")
    ap.add_argument("--warmup-steps", type=int, default=4,
                    help="earlier synthetic rollouts the learned predictor observes first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--every-step", action="store_true", help="call plan every decode step")
    ap.add_argument("--fptas", action="store_true", help="also time the FPTAS on 4,096 sequences")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)

    def synth(seed: int) -> Trace:
        return synthetic_trace(args.synthetic, args.prompts, args.group_size,
                               args.max_new_tokens, seed=seed)

    trace = load_trace(args.lengths) if args.lengths else synth(args.seed)
    rows: list[dict] = []
    for i, pname in enumerate(p.strip() for p in args.predictor.split(",")):
        pred: str | LengthPredictor = pname
        if pname != "oracle":
            pred = make_predictor(pname)
            if not args.lengths:  # warm-up needs prompts from the same world as the trace
                warm_predictor(pred, [synth(args.seed + 1000 + k) for k in range(args.warmup_steps)])
        policies = ["full_group", "naive_micro", "continuous", "length_aware"] if i == 0 else ["length_aware"]
        rows += simulate_policies(trace, policies, args.slots, args.kv_budget, pred, args.every_step)
    full = [r for r in rows if r["policy"] == "full_group"]
    for r in rows:  # later predictor runs compare with the first run's full_group
        if full and r["policy"] != "full_group":
            r["peak_kv_vs_full"] = r["peak_kv_tokens"] / full[0]["peak_kv_tokens"]
    n = len(trace.items)
    print(f"trace: {n} sequences, {len({g for g, _, _ in trace.items})} prompts, "
          f"mean length {np.mean(trace.lengths):.1f}, max {max(trace.lengths)}; slots {args.slots}, "
          f"kv budget {rows[0]['kv_budget_tokens']}")
    print(format_table(rows))
    out: dict = {"rows": rows}
    if args.fptas:
        out["fptas"] = [time_fptas(capacity_fraction=f) for f in (0.25, 0.02, 0.001)]
        for t in out["fptas"]:
            print(f"fptas n={t['n']} eps={t['eps']} capacity {t['capacity_fraction']:.3f} of total:"
                  f" {t['chosen']} chosen, best {t['best_ms']:.1f} ms, median {t['median_ms']:.1f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
