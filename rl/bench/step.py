"""`python -m rl.bench step`: full GRPO steps, phase split, tokens/s, learner layouts.

Part 1 drives the real Trainer (Ray, vLLM rollout actor, learner actor, verified weight sync)
for --steps steps of --config (default configs/bench_step.yaml: the quickstart workload at
8 prompts x group 8, <= 128 new tokens) and reads its metrics.jsonl. Step 1 is warm-up and
left out of the means when there are more steps. Phases per step:

  generate  rollout (vLLM)         reward  reward executor       train  advantages + update
  sync      weight sync + canary   idle    step wall time not in any phase (driver overhead)

Part 2 (skip with --no-layouts) times the learner alone, in this process, on sequences from
one more rollout of the same run (whole GRPO groups): the micro-batch layouts shared_prompt,
padded and packed (rl/logprobs.py), eager vs SDPA attention, bf16 autocast vs float32, as
forward + backward seconds (`Learner.accumulate_gradients`, median of --layout-repeats
interleaved runs) per trained token.

Learner TFLOP/s and MFU (rl/perf.py: model FLOPs of the trained sequences, training = 3x
forward, LM head on response tokens only, against perf.peak_tflops of the learner's device
and dtype): per layout variant from the exact sequence lengths; for the training loop from
the trainer's perf/* metrics when it logs them, else estimated from the mean prompt and
response lengths (likewise rollout tokens/s and MFU from the generate phase).

--profile (needs part 2's rollout): one learner update (`PolicyUpdate.step`: forward,
backward, optimizer) on the same sequences, in the config's layout and dtype, under
torch.profiler after a warm-up update: a chrome trace (learner_trace.json in --out-dir) and
the time per category (GEMMs, LM head + log-softmax, attention, optimizer, casts,
communication, other ops, Python/other) from the ops' self CPU (and CUDA) times, printed and
written to learner_profile.txt and step.json.

    python -m rl.bench step [--config configs/bench_step.yaml] [--steps 3] [--profile] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from rl.bench.table import print_table

PHASES = ("generate", "reward", "train", "sync", "idle")
# Learner comparison: (autocast dtype, [(layout, packed row tokens, attention kernel)]).
VARIANTS = (("bfloat16", [("shared_prompt", 0, "eager"), ("shared_prompt", 0, "sdpa"),
                          ("padded", 0, "eager"), ("padded", 0, "sdpa"), ("packed", 256, "eager")]),
            ("float32", [("shared_prompt", 0, "eager"), ("padded", 0, "eager")]))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="configs/bench_step.yaml")
    p.add_argument("--steps", type=int, default=3, help="training steps (step 1 is warm-up)")
    p.add_argument("--out-dir", default="outputs/bench/step")
    p.add_argument("--no-layouts", action="store_true", help="skip the learner layout comparison")
    p.add_argument("--layout-sequences", type=int, default=64,
                   help="sequences per learner update in the layout comparison (whole groups)")
    p.add_argument("--layout-repeats", type=int, default=2)
    p.add_argument("--profile", action="store_true",
                   help="profile one learner update: chrome trace + time per category (GEMM, LM head, ...)")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")


# --- part 1: the real training loop ---------------------------------------------------------

def run_training(config_path: str, steps: int, out_dir: Path, overrides: list[str],
                 keep_rollout: bool = False) -> tuple[list[dict], list | None]:
    """Train `steps` steps; return the metrics rows (and one more rollout's samples)."""
    import ray

    from rl.config import load_config
    from rl.train import init_ray, preflight
    from rl.trainer import Trainer

    run_dir = out_dir / "run"
    config = load_config(config_path, list(overrides) + [
        f"trainer.total_steps={steps}", f"trainer.output_dir={run_dir}", "trainer.checkpoint_every=0"])
    metrics_file = run_dir / "metrics.jsonl"
    if metrics_file.exists():
        metrics_file.unlink()  # a fresh run, not appended to an old one
    prepared = preflight(config)
    _workers_not_niced()
    init_ray(config)
    trainer = Trainer(prepared)
    samples = None
    try:
        trainer.fit()
        if keep_rollout:
            samples = trainer.sample_and_score().samples  # one more step's rollout (and rewards)
    finally:
        trainer.close()
        ray.shutdown()
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    return rows, samples


def _workers_not_niced() -> None:
    """Ray starts its worker processes at nice 15. On a machine shared with other jobs that
    starves the actors (rollout, learner) against everything at nice 0, including TRL, which
    runs in the driver: benchmarks start Ray with workers at nice 0."""
    import os

    os.environ.setdefault("RAY_worker_niceness", "0")


def phase_split(rows: list[dict]) -> dict:
    """Mean over the steps after warm-up: seconds per phase, tokens/s, learner padding."""
    kept = rows[1:] if len(rows) > 1 else rows
    mean = lambda key: statistics.fmean(r.get(key, 0.0) for r in kept)  # noqa: E731
    out = {f"{p}_s": mean(f"time/{p}") for p in PHASES if p != "idle"}
    out["step_s"] = mean("time/step")
    out["idle_s"] = max(0.0, out["step_s"] - sum(out[f"{p}_s"] for p in PHASES if p != "idle"))
    completion = mean("tokens/generated")
    out.update({
        "steps_measured": len(kept),
        "completion_tokens": completion,
        "trained_tokens": mean("train/tokens"),
        "generated_tok_per_s": completion / max(out["generate_s"], 1e-9),
        "trained_tok_per_s": mean("train/tokens") / max(out["train_s"], 1e-9),
        "trained_completion_tok_per_s_train": completion / max(out["train_s"], 1e-9),
        "completion_tok_per_step_s": completion / max(out["step_s"], 1e-9),
        "padding_fraction": mean("train/padding_fraction"),
        "micro_batches": mean("train/micro_batches"),
        "sync_gb_per_s": mean("sync/gb_per_s"),
        "sync_max_logprob_diff": max(r.get("sync/max_logprob_diff", 0.0) for r in kept),
        "reward_mean": mean("reward/mean"),
        "response_length_mean": mean("response_length/mean"),
    })
    return out


# --- part 2: the learner alone: layouts, attention kernels, precision ---------------------------

def layout_comparison(config_path: str, overrides: list[str], samples: list, num_sequences: int,
                      repeats: int) -> list[dict]:
    """Seconds per `Learner.accumulate_gradients` on the same sequences for every variant."""
    import dataclasses

    import torch

    from rl import perf
    from rl.config import load_config
    from rl.learner import Learner
    from rl.packing import pack_micro_batches, padding_fraction
    from rl.train import resolve_model_path

    config = load_config(config_path, overrides)
    batch = train_batch(samples, num_sequences, config.rollout.max_new_tokens)
    lengths = [len(p) + len(r) for p, r in zip(batch.prompt_ids, batch.response_ids)]
    flops = _learner_flops(config, batch)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    budget = config.learner.micro_batch_tokens
    results = []
    for dtype, variants in VARIANTS:
        learner = Learner(dataclasses.replace(config.model, path=resolve_model_path(config.model.path), dtype=dtype),
                          dataclasses.replace(config.learner, micro_batch_tokens=budget, lr=1e-9, layout="padded",
                                              attn_implementation="eager"), config.objective, seed=0)
        update = learner.updater
        times: dict[tuple, list[float]] = {v: [] for v in variants}
        stats: dict[tuple, dict] = {}
        update.accumulate_gradients(batch)  # warm-up: allocator, oneDNN primitives
        for _ in range(repeats):
            for variant in variants:  # interleaved, so background load drifts hit all alike
                layout, row, attn = variant
                update.micro_batches.layout, update.micro_batches.packed_row_tokens = layout, row
                learner.policy.net.set_attn_implementation(attn)
                update.optimizer.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                stats[variant] = update.accumulate_gradients(batch)  # forward + backward
                times[variant].append(time.perf_counter() - t0)
        for variant in variants:
            layout, row, attn = variant
            st, seconds = stats[variant], statistics.median(times[variant])
            label = f"packed/{row}" if layout == "packed" else layout
            peak = perf.peak_tflops(device, dtype)
            results.append({"layout": label, "attention": attn, "dtype": dtype, "seconds": seconds,
                            "seconds_all": times[variant], "micro_batches": st["micro_batches"],
                            "tokens": sum(lengths), "processed_tokens": st["processed_tokens"],
                            "padding_fraction": 1 - st["real_tokens"] / st["processed_tokens"],
                            "trained_tok_per_s": sum(lengths) / seconds,
                            "learner_tflops": perf.tflops(flops, seconds), "peak_tflops": peak,
                            "learner_mfu": perf.mfu(flops, seconds, peak)})
        del learner
    results[0]["padding_fraction_greedy_before"] = padding_fraction(lengths, _greedy_padded(lengths, budget))
    results[0]["padding_fraction_padded_dp"] = padding_fraction(lengths, pack_micro_batches(lengths, budget))
    return results


def train_batch(samples: list, num_sequences: int, max_new_tokens: int):
    """A TrainBatch of the first `num_sequences` samples with a response: whole groups, in
    rollout order, as training sees them (shared_prompt relies on it); random advantages."""
    import torch

    from rl.learner import TrainBatch

    picked = [s for s in samples if s.response_ids][:num_sequences]
    gen = torch.Generator().manual_seed(0)
    return TrainBatch(
        prompt_ids=[s.prompt_ids for s in picked], response_ids=[s.response_ids for s in picked],
        advantages=[torch.randn(len(s.response_ids), generator=gen).tolist() for s in picked],
        rollout_logprobs=[s.logprobs for s in picked], num_tokens=float(sum(len(s.response_ids) for s in picked)),
        num_seqs=float(len(picked)), max_len=float(max_new_tokens))


def _hf_config(config):
    from transformers import AutoConfig

    from rl.train import resolve_model_path

    return AutoConfig.from_pretrained(resolve_model_path(config.model.path))


def _learner_flops(config, batch) -> float:
    from rl import perf

    return perf.learner_flops(_hf_config(config), [len(p) for p in batch.prompt_ids],
                              [len(r) for r in batch.response_ids])


def perf_split(rows: list[dict], split: dict, hf_config, learner_peak: float, rollout_peak: float) -> dict:
    """perf/learner_tflops, perf/learner_mfu, perf/rollout_tokens_per_s, perf/rollout_mfu of
    the training loop: the trainer's own metrics when it logs them (mean after warm-up), else
    estimated from the phase split's mean lengths (every sequence at the mean prompt and
    response length: the attention term is then slightly low)."""
    from rl import perf

    kept = rows[1:] if len(rows) > 1 else rows
    logged = {k: statistics.fmean(r[k] for r in kept) for k in
              ("perf/learner_tflops", "perf/learner_mfu", "perf/rollout_tokens_per_s", "perf/rollout_mfu")
              if kept and all(k in r for r in kept)}
    response = split["response_length_mean"]
    n = split["completion_tokens"] / response if response else 0.0
    out = {}
    if n:
        prompt = max(0.0, (split["trained_tokens"] - split["completion_tokens"]) / n)
        p, r = [round(prompt)], [round(response)]
        learner_flops = perf.learner_flops(hf_config, p, r) * n
        rollout_flops = perf.rollout_flops(hf_config, p, r) * n
        out = {"perf/learner_tflops": perf.tflops(learner_flops, split["train_s"]),
               "perf/learner_mfu": perf.mfu(learner_flops, split["train_s"], learner_peak),
               "perf/rollout_tokens_per_s": split["completion_tokens"] / max(split["generate_s"], 1e-9),
               "perf/rollout_mfu": perf.mfu(rollout_flops, split["generate_s"], rollout_peak)}
    out.update(logged)
    out.update({"perf/source": "trainer metrics" if logged else "estimated from mean lengths",
                "perf/learner_peak_tflops": learner_peak, "perf/rollout_peak_tflops": rollout_peak})
    return out


def profile_learner(config, samples: list, num_sequences: int, out_dir: Path) -> dict:
    """One profiled learner update (after a warm-up one) on `num_sequences` of `samples`, in
    the config's layout and dtype: chrome trace + time per category (rl.perf)."""
    import dataclasses

    import torch
    from torch.profiler import ProfilerActivity, profile

    from rl import perf
    from rl.learner import Learner
    from rl.train import resolve_model_path

    batch = train_batch(samples, num_sequences, config.rollout.max_new_tokens)
    # the hand-built batch is one mini-batch; everything else as configured
    one = {"mini_batches": 1} if "mini_batches" in {f.name for f in dataclasses.fields(config.learner)} else {}
    learner = Learner(dataclasses.replace(config.model, path=resolve_model_path(config.model.path)),
                      dataclasses.replace(config.learner, **one), config.objective,
                      temperature=config.rollout.temperature, seed=0)
    update, net = learner.updater, learner.policy.net
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    update.step(batch)  # warm-up: allocator, kernels
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with perf.tag_attention(net), profile(activities=activities) as prof:
        sync()
        t0 = time.perf_counter()
        update.step(batch)
        sync()
        wall = time.perf_counter() - t0
    trace = out_dir / "learner_trace.json"
    prof.export_chrome_trace(str(trace))
    result = perf.profile_categories(prof, wall)
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    top = prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60)
    flops = _learner_flops(config, batch)
    peak = perf.peak_tflops("cuda" if cuda else "cpu", config.model.dtype)
    result.update({"trace": str(trace), "sequences": len(batch.response_ids),
                   "layout": config.learner.resolved_layout, "dtype": config.model.dtype,
                   "learner_tflops": perf.tflops(flops, wall), "learner_mfu": perf.mfu(flops, wall, peak),
                   "peak_tflops": peak})
    text = (f"learner update ({result['sequences']} sequences, layout {result['layout']}, {result['dtype']}): "
            f"{wall:.3f} s, {result['learner_tflops']:.3f} TFLOP/s, MFU {result['learner_mfu']:.3f} "
            f"of {peak:.2f}\n{perf.format_categories(result)}\n\n{top}")
    (out_dir / "learner_profile.txt").write_text(text)
    print(text.split("\n\n")[0])
    print(f"wrote {trace} and {out_dir / 'learner_profile.txt'}")
    del learner
    return result


def _greedy_padded(lengths: list[int], budget: int) -> list[list[int]]:
    """The padded packer before the DP one (fill each micro-batch to the budget, sorted), for
    the "padding before" number."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups, current = [], []
    for i in order:
        if current and (len(current) + 1) * lengths[current[0]] > budget:
            groups.append(current)
            current = []
        current.append(i)
    return groups + ([current] if current else [])


# --- output ---------------------------------------------------------------------------------

def plot(split: dict, layouts: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if layouts else 1, figsize=(10 if layouts else 5, 4), squeeze=False)
    ax = axes[0][0]
    bottom = 0.0
    for phase in PHASES:
        v = split[f"{phase}_s"]
        ax.bar(["GRPO step"], [v], bottom=bottom, label=f"{phase} {v:.1f}s")
        bottom += v
    ax.set_ylabel("seconds")
    ax.set_title(f"phase split ({split['completion_tokens']:.0f} completion tokens/step)")
    ax.legend(fontsize=8)
    if layouts:
        ax = axes[0][1]
        labels = [f"{r['layout']}\n{r['attention']} {r['dtype']}" for r in layouts]
        ax.bar(labels, [r["trained_tok_per_s"] for r in layouts], color=[f"C{i}" for i in range(len(layouts))])
        ax.tick_params(axis="x", labelsize=7)
        ax.set_ylabel("trained tokens / s (Learner.update)")
        ax.set_title("learner: micro-batch layout and precision")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def training_perf(config_path: str, overrides: list[str], rows: list[dict], split: dict) -> dict:
    """`perf_split` with the model's transformers config and the learner's and rollout's
    peaks (this machine's device; the config's dtype)."""
    import torch

    from rl import perf
    from rl.config import load_config

    config = load_config(config_path, overrides)
    peak = perf.peak_tflops("cuda" if torch.cuda.is_available() else "cpu", config.model.dtype)
    return perf_split(rows, split, _hf_config(config), peak, peak)


def report_split(split: dict) -> None:
    print_table([split], [f"{p}_s" for p in PHASES] + ["step_s", "generated_tok_per_s", "trained_tok_per_s",
                                                        "completion_tok_per_step_s", "padding_fraction"])


def report_layouts(layouts: list[dict]) -> dict:
    print_table(layouts, ["layout", "attention", "dtype", "seconds", "micro_batches", "tokens",
                          "processed_tokens", "padding_fraction", "trained_tok_per_s", "learner_tflops",
                          "learner_mfu"])
    by = {(r["layout"], r["attention"], r["dtype"]): r["trained_tok_per_s"] for r in layouts}
    bf16, fp32 = "bfloat16", "float32"
    ratios = {
        "shared_over_padded_eager_bf16": by[("shared_prompt", "eager", bf16)] / by[("padded", "eager", bf16)],
        "eager_over_sdpa_shared_bf16": by[("shared_prompt", "eager", bf16)] / by[("shared_prompt", "sdpa", bf16)],
        "eager_over_sdpa_padded_bf16": by[("padded", "eager", bf16)] / by[("padded", "sdpa", bf16)],
        "packed256_over_padded_eager_bf16": by[("packed/256", "eager", bf16)] / by[("padded", "eager", bf16)],
        "bf16_over_fp32_shared": by[("shared_prompt", "eager", bf16)] / by[("shared_prompt", "eager", fp32)],
        "bf16_over_fp32_padded": by[("padded", "eager", bf16)] / by[("padded", "eager", fp32)],
        "padding_before_greedy": layouts[0]["padding_fraction_greedy_before"],
        "padding_padded_dp": layouts[0]["padding_fraction_padded_dp"],
    }
    print("ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    return ratios


def run(args) -> int:
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, samples = run_training(args.config, args.steps, out, args.overrides,
                                 keep_rollout=not args.no_layouts or args.profile)
    split = phase_split(rows)
    report_split(split)
    perf_metrics = training_perf(args.config, args.overrides, rows, split)
    print("perf: " + ", ".join(f"{k.removeprefix('perf/')} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                               for k, v in perf_metrics.items()))
    layouts, ratios, profiled = [], {}, None
    if not args.no_layouts:
        layouts = layout_comparison(args.config, args.overrides, samples, args.layout_sequences,
                                    args.layout_repeats)
        ratios = report_layouts(layouts)
    if args.profile:
        from rl.config import load_config

        profiled = profile_learner(load_config(args.config, args.overrides), samples, args.layout_sequences, out)
    (out / "step.json").write_text(json.dumps({"config": args.config, "overrides": args.overrides,
                                               "split": split, "perf": perf_metrics, "layouts": layouts,
                                               "ratios": ratios, "profile": profiled, "steps": rows}, indent=2))
    plot(split, layouts, out / "step.png")
    print(f"wrote {out / 'step.json'} and {out / 'step.png'}")
    return 0
