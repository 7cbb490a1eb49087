"""A step's metrics: merged over generation batches, summarized, and the one-line report."""

from __future__ import annotations

import statistics

from rollout.records import Sample

# Last part of a metric name whose values add up over a step's generation batches.
_SUMMED = ("seconds", "steps", "count", "none", "errors", "timeouts", "invalid", "unscored",
           "restarts", "preemptions")


def merge_batches(rows: list[dict]) -> dict:
    """One step's metrics from those of its generation batches: counts and times add up, peaks
    and maxima take the max, minima the min, the rest (means, stds) average over batches."""
    if len(rows) == 1:
        return dict(rows[0])
    out = {}
    for key in rows[0]:
        values = [r[key] for r in rows if key in r]
        last = key.rsplit("/", 1)[-1]
        if "peak" in last or last == "max":
            out[key] = max(values)
        elif last == "min":
            out[key] = min(values)
        elif last.endswith(_SUMMED):
            out[key] = sum(values)
        else:
            out[key] = statistics.fmean(values)
    return out


def rollout_metrics(samples: list[Sample], stats: dict) -> dict:
    lengths = [len(s.response_ids) for s in samples]
    generated = sum(lengths)
    return {"response_length/mean": statistics.fmean(lengths), "response_length/max": float(max(lengths)),
            "response_length/min": float(min(lengths)),
            "response/truncated_fraction": sum(s.finish_reason == "length" for s in samples) / len(samples),
            "tokens/generated": float(generated),
            "tokens/generated_per_second": generated / max(stats["rollout/seconds"], 1e-9), **stats}


def reward_summary(rewards: list[float], valid: list[bool]) -> dict:
    kept = [r for r, v in zip(rewards, valid) if v] or [0.0]
    return {"reward/mean": statistics.fmean(kept), "reward/std": statistics.pstdev(kept)}


def summary_line(step: int, m: dict) -> str:
    return (f"step {step}: reward {m['reward/mean']:.3f} ± {m['reward/std']:.3f} | len {m['response_length/mean']:.1f} "
            f"| loss {m['loss']:+.4f} | entropy {m.get('entropy', float('nan')):.3f} | grad {m['grad_norm']:.3f} "
            f"| sync Δ {m.get('sync/max_logprob_diff', float('nan')):.2e} | gen {m['time/generate']:.1f}s train {m['time/train']:.1f}s "
            f"sync {m['time/sync']:.1f}s step {m['time/step']:.1f}s"
            + (f" | MFU learner {m['perf/learner_mfu']:.1%} rollout {m['perf/rollout_mfu']:.1%}"
               if "perf/learner_mfu" in m and "perf/rollout_mfu" in m else "")
            + (f" | stale {m['staleness/max']:.0f}" if m.get("staleness/max") else ""))
