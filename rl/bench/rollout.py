"""`python -m rl.bench rollout`: the Infinite Sampling policies side by side.

Simulation (seconds, no engine; the decode-step simulator `scheduling.simulate` on a length
trace: a recorded one from configs/traces/, or a synthetic long-tailed one):

    python -m rl.bench rollout --simulate --lengths configs/traces/smollm2_mixed_step0.json \\
        --warmup-lengths configs/traces/smollm2_mixed_256_warmup.json --slots 32 --json sim.json
    python -m rl.bench rollout --simulate --synthetic pareto --prompts 64 --group-size 16
    python -m rl.bench rollout --simulate --fptas     # also time the FPTAS on 4,096 sequences

Real vLLM (SmolLM2-135M-Instruct on CPU by default; every policy on the same engine, same prompts):

    python -m rl.bench rollout --prompts 8 --group-size 16 --max-new-tokens 256 --json real.json

Same memory budget C (--kv-budget, default G x (longest prompt + max_new_tokens)): naive_micro
and continuous get the slots that are safe without knowing lengths, floor(C / (longest prompt
+ max_new_tokens)); length_aware gets the KV budget C itself and the engine's max_num_seqs;
full_group gets no limit. `--engine-kv-tokens C` also sizes the engine's cache to C so vLLM
preempts whatever overflows it. `--record-trace OUT` writes the first policy's lengths as a
length trace (scheduling/traces.py format). Every run prints a table and writes a PNG next to
--json (or --plot PATH).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from scheduling import (
    EngineKVModel,
    LengthPredictor,
    OracleLengthPredictor,
    Trace,
    fptas_knapsack,
    load_trace,
    make_policy,
    make_predictor,
    save_trace,
    simulate as simulate_policy,
    synthetic_trace,
)

POLICIES = ("full_group", "naive_micro", "continuous", "length_aware")
PREDICTOR_POLICIES = {"length_aware"}  # policies that take a `predictor=` argument
MICRO_GROUP_POLICIES = {"naive_micro", "continuous", "length_aware"}  # decode in rounds of g
PROMPTS_FILE = Path(__file__).resolve().parents[2] / "configs" / "traces" / "mixed_prompts.yaml"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--simulate", action="store_true", help="decode-step simulator instead of vLLM")
    p.add_argument("--lengths", nargs="+",
                   help="simulate on this JSON length trace; several (the steps of a training run, "
                        "in order): each is simulated in turn and the learned predictor carries "
                        "over what it learned from the earlier ones, as in training (sums reported)")
    p.add_argument("--warmup-lengths", nargs="*", default=[],
                   help="traces of earlier steps the learned predictor observes first (both modes)")
    p.add_argument("--synthetic", choices=["lognormal", "pareto"], default="lognormal",
                   help="simulate on a synthetic long-tailed trace when --lengths is not given")
    p.add_argument("--warmup-steps", type=int, default=4,
                   help="synthetic: earlier synthetic rollouts the learned predictor observes")
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated")
    p.add_argument("--predictor", default=None,
                   help="length_aware predictors, comma-separated: constant, token_conditioned, egtp; "
                        "in simulation also oracle (true lengths) and oracle_prompt_mean (each prompt's "
                        "true mean length). Simulation default: oracle,token_conditioned; real: "
                        "token_conditioned")
    p.add_argument("--admission", default="optimistic",
                   help="length_aware admissions, comma-separated: optimistic, conservative")
    p.add_argument("--preemption", default="lifo",
                   help="length_aware's choice of what vLLM preempts, comma-separated: lifo (vLLM's "
                        "default, the most recently scheduled), predicted_longest, predicted_shortest "
                        "(vLLM's priority scheduling by predicted output length)")
    p.add_argument("--engine-model", action="store_true",
                   help="simulation: every policy in a model of a vLLM engine of --kv-budget tokens "
                        "(blocks of --block-size, shared prompt blocks, preemption)")
    p.add_argument("--prompts", type=int, default=8, help="B prompts (real, synthetic)")
    p.add_argument("--group-size", type=int, default=16, help="G samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--slots", type=int, default=None,
                   help="simulation: S for every policy (default 32); real: slots of "
                        "naive_micro/continuous (default: safe for the KV budget)")
    p.add_argument("--kv-budget", type=int, default=None, help="C, KV tokens (see above)")
    p.add_argument("--micro-group-size", type=int, default=None,
                   help="g: rounds of g sequences (slots capped at g) for naive_micro, continuous and "
                        "length_aware, as rollout.scheduler.micro_group_size in training (default: "
                        "no cap; naive_micro's micro-groups are then G samples, or the slots in simulation)")
    p.add_argument("--fptas", action="store_true", help="also time the FPTAS on 4,096 sequences")
    p.add_argument("--every-step", action="store_true", help="simulation: plan every step")
    # real mode
    p.add_argument("--model", default="demo:SmolLM2-135M-Instruct")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prompt-set", choices=["mixed", "arithmetic"], default="mixed",
                   help="mixed: configs/traces/mixed_prompts.yaml alternating with arithmetic")
    p.add_argument("--prompt-offset", type=int, default=0, help="first prompt of the slice")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--block-size", type=int, default=32, help="vLLM KV block size (CPU: x32)")
    p.add_argument("--engine-kv-tokens", type=int, default=None,
                   help="size the engine's KV cache to this many tokens (default: from memory)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="vLLM max_num_seqs")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--record-trace", help="write the first policy's lengths here (real mode)")
    p.add_argument("--json", help="write the rows and settings here")
    p.add_argument("--plot", help="PNG path (default: --json with .png)")


def run(args: argparse.Namespace) -> int:
    out = simulate(args) if args.simulate else real(args)
    if out["mode"] == "simulate":
        print(f"trace: {out['sequences']} sequences, {out['groups']} prompts, mean length "
              f"{out['mean_length']:.1f}, max {out['max_length']}; slots {out['slots']}, "
              f"kv budget {out['rows'][0]['kv_budget_tokens']}")
    print(format_rows(out["rows"], out["mode"]))
    for t in out.get("fptas", []):
        print(f"fptas n={t['n']} eps={t['eps']} capacity {t['capacity_fraction']:.3f} of total "
              f"weight: {t['chosen']} chosen, best {t['best_ms']:.1f} ms, median {t['median_ms']:.1f} ms")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    plot = args.plot or (str(Path(args.json).with_suffix(".png")) if args.json else None)
    if plot:
        save_plot(out, plot)
        print(f"plot: {plot}")
    return 0


# --- simulation --------------------------------------------------------------------------------


def warm_predictor(predictor: LengthPredictor, traces: Sequence[Trace]) -> LengthPredictor:
    """Let `predictor` observe every sample of earlier rollouts (earlier training steps)."""
    for tr in traces:
        predictor.begin_rollout()
        for s, n in zip(tr.to_seqs(), tr.lengths):
            predictor.observe(s, n)
    return predictor


def attach_prompt_features(traces: Sequence[Trace], model: str) -> float:
    """Give every trace the EGTP features of its prompts (`Trace.prompt_features`), encoded
    with `model` (the egtp predictor needs them; traces keep the prompt ids, not the
    features). Returns the mean seconds per prompt."""
    from rollout.prompt_encoder import PromptEncoder

    if model.startswith("demo:"):
        from rl.demo_model import prepare_demo_model

        model = str(prepare_demo_model())
    encoder = PromptEncoder(model)
    n, t0 = 0, time.perf_counter()
    for tr in traces:
        groups = sorted({g for g, _, _ in tr.items}, key=str)
        missing = [g for g in groups if g not in tr.prompt_ids]
        if missing:
            raise SystemExit(f"the egtp predictor needs prompt ids; this trace has none for groups {missing[:5]} "
                             "(record traces with --record-trace)")
        feats = encoder.encode([tr.prompt_ids[g] for g in groups])
        tr.prompt_features.update(zip(groups, feats))
        n += len(groups)
    return (time.perf_counter() - t0) / max(n, 1)


def default_kv_budget(trace: Trace, slots: int) -> int:
    """slots x (mean prompt + max_new_tokens): an engine sized so that `slots` sequences of full
    length fit, i.e. the slot count, not the KV, is the binding limit (as vLLM's max_num_seqs
    with enough KV). Pass a smaller budget to study the KV-bound regime."""
    prompts = float(np.mean([p for _, p, _ in trace.items]))
    return int(slots * (prompts + trace.max_new_tokens))


ORACLES = ("oracle", "oracle_prompt_mean")
"""Simulation-only predictors built from the trace: each sample's true length, and each
prompt's true mean length (the best that any predictor which sees only the prompt can do)."""


def prompt_mean_lengths(trace: Trace) -> dict[int, float]:
    """{sample index: the mean true length of its prompt's samples}."""
    by_group: dict = {}
    for g, _, n in trace.items:
        by_group.setdefault(g, []).append(n)
    return {i: sum(by_group[g]) / len(by_group[g]) for i, (g, _, _) in enumerate(trace.items)}


def simulate_policies(
    trace: Trace,
    policies: Sequence[str] = POLICIES,
    slots: int = 32,
    kv_budget_tokens: int | None = None,
    predictor: str | LengthPredictor = "oracle",
    plan_every_step: bool = False,
    micro_group_size: int | None = None,
    admission: str = "optimistic",
    engine_block_tokens: int | None = None,
    preemption: str = "lifo",
) -> list[dict]:
    """One row of measures per policy. `predictor` is a name ("oracle" is built from the trace)
    or an instance, deep-copied per policy so every policy starts from the same state.
    kv_budget_tokens None: see `default_kv_budget`. micro_group_size g: rounds of g, as in
    training (`rl.actors.scheduler_options`): naive_micro's micro-groups are g samples and the
    slots of naive_micro, continuous and length_aware are capped at g; None: no cap.
    admission: length_aware's (optimistic | conservative). engine_block_tokens: run every policy
    in the model of a vLLM engine of kv_budget_tokens (blocks of this size, prompt blocks shared,
    preemption: scheduling/engine_model.py); None: the plain decode-step model. preemption:
    length_aware's victim in that model (scheduling.engine_model.PREEMPTIONS)."""
    trace = Trace.coerce(trace)
    if kv_budget_tokens is None:
        kv_budget_tokens = default_kv_budget(trace, slots)
    rows, full_peak = [], None
    for name in policies:
        kw = {}
        if name in PREDICTOR_POLICIES:
            if isinstance(predictor, str) and predictor == "oracle":
                kw["predictor"] = OracleLengthPredictor(dict(enumerate(trace.lengths)))
            elif isinstance(predictor, str) and predictor == "oracle_prompt_mean":
                kw["predictor"] = OracleLengthPredictor(prompt_mean_lengths(trace))
                kw["predictor"].name = predictor
            elif isinstance(predictor, str):
                kw["predictor"] = make_predictor(predictor)
            else:
                kw["predictor"] = copy.deepcopy(predictor)
            kw["admission"] = admission
        policy_slots = slots
        if micro_group_size is not None and name in MICRO_GROUP_POLICIES:
            policy_slots = min(slots, micro_group_size)
            if name == "naive_micro":
                kw["micro_group_size"] = micro_group_size
        victim = "lifo" if preemption == "lifo" or name not in PREDICTOR_POLICIES else preemption
        engine = (EngineKVModel(kv_budget_tokens, engine_block_tokens, share_prompts=True,
                                max_running=policy_slots, victim=victim) if engine_block_tokens else None)
        res = simulate_policy(make_policy(name, **kw), trace, policy_slots,
                              kv_budget_tokens, plan_every_step, engine=engine)
        row = res.as_dict()
        row["predictor"] = kw["predictor"].name if "predictor" in kw else "-"
        row["admission"] = kw.get("admission", "-")
        row["preemption"] = preemption if name in PREDICTOR_POLICIES else "-"
        row["slots"] = policy_slots
        row["kv_budget_tokens"] = kv_budget_tokens
        if name == "full_group":
            full_peak = res.peak_kv_tokens
        rows.append(row)
    for row in rows:
        row["peak_kv_vs_full"] = row["peak_kv_tokens"] / full_peak if full_peak else float("nan")
    return rows


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


SUMMED = ("decode_steps", "lower_bound", "total_tokens", "overhead_s", "plan_calls", "kv_over_budget_steps",
          "kv_lower_bound", "preemptions", "recomputed_tokens", "engine_kv_lower_bound")


def replay_steps(traces: Sequence[Trace], warm: Sequence[Trace], policies: Sequence[str], slots: int,
                 kv_budget_tokens: int | None, predictor: str, plan_every_step: bool = False,
                 micro_group_size: int | None = None, admission: str = "optimistic",
                 engine_block_tokens: int | None = None, preemption: str = "lifo") -> list[dict]:
    """The rollouts of a training run, in order: each trace is simulated, then the learned
    predictor observes its lengths before the next (what it does in training), starting from
    `warm` (none: a cold start). One row per policy, summed over the traces (peaks: the max;
    MAE: the mean over all sequences)."""
    carried = None if predictor in ORACLES else warm_predictor(make_predictor(predictor), warm)
    per_step: list[list[dict]] = []
    for trace in traces:
        per_step.append(simulate_policies(trace, policies, slots, kv_budget_tokens,
                                          predictor if carried is None else carried,
                                          plan_every_step, micro_group_size, admission, engine_block_tokens,
                                          preemption))
        if carried is not None:
            warm_predictor(carried, [trace])
    rows = []
    for i, first in enumerate(per_step[0]):
        steps = [rows_k[i] for rows_k in per_step]
        row = dict(first)
        for key in SUMMED:
            row[key] = sum(r[key] for r in steps)
        for key in ("peak_kv_tokens", "peak_concurrency", "kv_budget_tokens"):
            row[key] = max(r[key] for r in steps)
        row["mean_concurrency"] = row["total_tokens"] / max(row["decode_steps"], 1)
        row["steps_over_bound"] = row["decode_steps"] / max(row["lower_bound"], 1)
        maes = [(r["predictor_mae"], len(t.items)) for r, t in zip(steps, traces) if r["predictor_mae"] is not None]
        row["predictor_mae"] = (sum(m * n for m, n in maes) / sum(n for _, n in maes)) if maes else None
        row["traces"] = len(traces)
        rows.append(row)
    return rows


def _length_aware_combos(args, preds: Sequence[str]) -> list[tuple[str, str, str]]:
    """Every (predictor, admission, preemption) asked for, in that nesting order."""
    admissions = [a.strip() for a in args.admission.split(",")]
    preemptions = [v.strip() for v in args.preemption.split(",")]
    return [(p, a, v) for p in preds for a in admissions for v in preemptions]


def simulate(args) -> dict:
    slots = args.slots or 32
    if args.lengths and len(args.lengths) > 1:
        return simulate_replay(args, slots)
    if args.lengths:
        trace = load_trace(args.lengths[0])
        warm = [load_trace(p) for p in args.warmup_lengths]
    else:
        def synth(seed: int) -> Trace:
            return synthetic_trace(args.synthetic, args.prompts, args.group_size,
                                   args.max_new_tokens, seed=seed)
        trace = synth(args.seed)
        warm = [synth(args.seed + 1000 + k) for k in range(args.warmup_steps)]
    policies = [p.strip() for p in args.policies.split(",")]
    rows = []
    preds = [p.strip() for p in (args.predictor or "oracle,token_conditioned").split(",")]
    if "egtp" in preds:
        attach_prompt_features([trace, *warm], args.model)
    combos = _length_aware_combos(args, preds)
    block = args.block_size if args.engine_model else None
    if args.engine_model and not args.kv_budget:
        raise SystemExit("--engine-model needs --kv-budget, the engine's KV tokens")
    for i, (name, admission, preemption) in enumerate(combos):
        pred = name if name in ORACLES else warm_predictor(make_predictor(name), warm)
        names = policies if i == 0 else [p for p in policies if p == "length_aware"]
        rows += simulate_policies(trace, names, slots, args.kv_budget, pred, args.every_step,
                                  args.micro_group_size, admission, block, preemption)
    full = next((r["peak_kv_tokens"] for r in rows if r["policy"] == "full_group"), None)
    for r in rows:  # later predictor runs compare with the first run's full_group
        r["peak_kv_vs_full"] = r["peak_kv_tokens"] / full if full else math.nan
    out = {"mode": "simulate", "rows": rows, "slots": slots,
           "trace": args.lengths[0] if args.lengths else f"synthetic:{args.synthetic}",
           "warmup": args.warmup_lengths,
           "sequences": len(trace.items), "groups": len({g for g, _, _ in trace.items}),
           "mean_length": sum(trace.lengths) / len(trace.items),
           "max_length": max(trace.lengths), "max_new_tokens": trace.max_new_tokens}
    if args.fptas:
        out["fptas"] = [time_fptas(capacity_fraction=f) for f in (0.25, 0.02, 0.001)]
    return out


def simulate_replay(args, slots: int) -> dict:
    """`simulate` for several traces in order (`replay_steps`)."""
    traces = [load_trace(p) for p in args.lengths]
    warm = [load_trace(p) for p in args.warmup_lengths]
    policies = [p.strip() for p in args.policies.split(",")]
    preds = [p.strip() for p in (args.predictor or "oracle,token_conditioned").split(",")]
    if "egtp" in preds:
        attach_prompt_features([*traces, *warm], args.model)
    combos = _length_aware_combos(args, preds)
    block = args.block_size if args.engine_model else None
    if args.engine_model and not args.kv_budget:
        raise SystemExit("--engine-model needs --kv-budget, the engine's KV tokens")
    rows = []
    for i, (name, admission, preemption) in enumerate(combos):
        names = policies if i == 0 else [p for p in policies if p in PREDICTOR_POLICIES]
        rows += replay_steps(traces, warm, names, slots, args.kv_budget, name, args.every_step,
                             args.micro_group_size, admission, block, preemption)
    full = next((r["peak_kv_tokens"] for r in rows if r["policy"] == "full_group"), None)
    for r in rows:
        r["peak_kv_vs_full"] = r["peak_kv_tokens"] / full if full else math.nan
    lengths = [n for t in traces for n in t.lengths]
    return {"mode": "simulate", "rows": rows, "slots": slots, "trace": args.lengths, "warmup": args.warmup_lengths,
            "sequences": len(lengths), "groups": sum(len({g for g, _, _ in t.items}) for t in traces),
            "mean_length": sum(lengths) / len(lengths), "max_length": max(lengths),
            "max_new_tokens": max(t.max_new_tokens for t in traces)}


# --- real engine ---------------------------------------------------------------------------------


def build_prompts(tokenizer, prompt_set: str, count: int, offset: int) -> list[list[int]]:
    """`count` chat-templated prompts as token ids, from position `offset` of the prompt set."""
    import yaml

    from rl.arithmetic_task import arithmetic_examples

    arith = [r["prompt"] for r in arithmetic_examples(num_examples=offset + count + 1, seed=1)]
    if prompt_set == "arithmetic":
        texts = arith[offset: offset + count]
    else:
        open_ended = yaml.safe_load(PROMPTS_FILE.read_text())["open_ended"]
        pool = [x for pair in zip(open_ended, arith) for x in pair]  # alternate the two kinds
        if offset + count > len(pool):
            raise SystemExit(f"prompt set 'mixed' has {len(pool)} prompts; asked for "
                             f"{offset}..{offset + count}")
        texts = pool[offset: offset + count]
    ids = []
    for t in texts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                             add_generation_prompt=True)
        ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids


def real(args) -> dict:
    from rl.demo_model import prepare_demo_model
    from rollout.records import SampleRequest
    from rollout.worker import RolloutWorker

    model = str(prepare_demo_model()) if args.model.startswith("demo:") else args.model
    from transformers import AutoTokenizer

    prompts = build_prompts(AutoTokenizer.from_pretrained(model), args.prompt_set, args.prompts,
                            args.prompt_offset)
    longest = max(len(p) for p in prompts)
    G, T = args.group_size, args.max_new_tokens
    budget = args.kv_budget or G * (longest + T)
    safe_slots = args.slots or max(1, budget // (longest + T))
    engine_kw = {"block_size": args.block_size, "max_num_seqs": args.max_num_seqs}
    if args.engine_kv_tokens:
        engine_kw["num_gpu_blocks_override"] = math.ceil(args.engine_kv_tokens / args.block_size) + 1
    worker = RolloutWorker(model, dtype=args.dtype, max_model_len=longest + T,
                           gpu_memory_utilization=args.gpu_memory_utilization, seed=args.seed,
                           num_threads=args.threads, engine_kwargs=engine_kw)
    worker.record_timeline = True
    requests = [SampleRequest(i, p) for i, p in enumerate(prompts)]
    sampling = dict(group_size=G, max_new_tokens=T, temperature=args.temperature)
    worker.generate(requests[:1], group_size=2, max_new_tokens=8)  # first-step costs, untimed
    warm = [load_trace(p) for p in args.warmup_lengths]
    if "egtp" in (args.predictor or ""):
        attach_prompt_features(warm, model)
    rows, first = [], None
    for name in [p.strip() for p in args.policies.split(",")]:
        preds = (args.predictor or "token_conditioned").split(",") if name == "length_aware" else ["-"]
        admissions = args.admission.split(",") if name == "length_aware" else ["-"]
        victims = args.preemption.split(",") if name == "length_aware" else ["lifo"]
        for pred, admission, preemption in ((p, a, v) for p in preds for a in admissions for v in victims):
            kw: dict = {}
            slots, kv = safe_slots, budget
            if name == "naive_micro":
                kw["micro_group_size"] = args.micro_group_size or G
            elif name == "length_aware":
                kw["predictor"] = warm_predictor(make_predictor(pred), warm)
                kw["admission"] = admission
                slots = args.max_num_seqs
            elif name == "full_group":
                slots, kv = args.max_num_seqs, worker.cache_tokens
            if args.micro_group_size and name in MICRO_GROUP_POLICIES:
                slots = min(slots, args.micro_group_size)
            worker.set_policy(name, kw, kv_budget_tokens=kv, slots=slots, preemption=preemption)
            worker.engine.reset_prefix_cache()  # no policy inherits the previous one's cache
            result = worker.generate(requests, **sampling)
            rows.append(real_row(name, pred, result.stats, budget)
                        | {"admission": admission, "preemption": preemption if name == "length_aware" else "-"})
            print(f"{name} ({pred}, {admission}, {preemption}): {result.stats.seconds:.1f} s", flush=True)
            if args.json:  # partial results survive an interrupted run
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps({"mode": "partial", "rows": rows}))
            first = first or result
    if args.record_trace:
        items = [(s.group_id, len(s.prompt_ids), max(1, len(s.response_ids))) for s in first.samples]
        meta = {"model": Path(model).name, "prompt_set": args.prompt_set,
                "prompt_offset": args.prompt_offset, "temperature": args.temperature,
                "group_size": G, "seed": args.seed, "recorded_with": "python -m rl.bench rollout"}
        save_trace(args.record_trace, Trace(items, T, {i: tuple(p) for i, p in enumerate(prompts)}, meta))
        print(f"trace: {args.record_trace}")
    full = next((r["peak_kv_tokens"] for r in rows if r["policy"] == "full_group"), None)
    for r in rows:
        r["peak_kv_vs_full"] = r["peak_kv_tokens"] / full if full else math.nan
    return {"mode": "real", "rows": rows, "model": Path(model).name, "prompts": args.prompts,
            "group_size": G, "max_new_tokens": T, "kv_budget_tokens": budget,
            "safe_slots": safe_slots, "engine_cache_tokens": worker.cache_tokens,
            "block_size": args.block_size, "prompt_set": args.prompt_set,
            "prompt_offset": args.prompt_offset, "temperature": args.temperature,
            "warmup": args.warmup_lengths}


def real_row(policy: str, predictor: str, st, budget: int) -> dict:
    x = st.extra
    return {
        "policy": policy, "predictor": predictor, "decode_steps": st.decode_steps,
        "lower_bound": x["lower_bound"],
        "steps_over_bound": st.decode_steps / max(x["lower_bound"], 1),
        "kv_lower_bound": x["kv_lower_bound"], "engine_kv_lower_bound": x["engine_kv_lower_bound"],
        "recomputed_tokens": x["recomputed_tokens"], "predictor_mae": x["predictor_mae"],
        "prompt_encoder_s": x.get("prompt_encoder_seconds"),
        "peak_kv_tokens": st.peak_kv_tokens, "engine_peak_kv_tokens": x["engine_peak_kv_tokens"],
        "kv_budget_tokens": x["kv_budget_tokens"], "slots": x["slots"],
        "peak_concurrency": st.peak_running, "engine_peak_running": x["engine_peak_running"],
        "generated_tokens": st.generated_tokens, "wall_s": st.seconds,
        "tokens_per_s": st.generated_tokens / max(st.seconds, 1e-9),
        "preemptions": st.preemptions, "overhead_s": st.scheduler_seconds,
        "overhead_frac": st.scheduler_seconds / max(st.seconds, 1e-9),
        "kv_over_budget_steps": sum(1 for t in x["timeline"] if t[1] > budget),
        "engine_over_budget_steps": sum(1 for t in x["timeline"] if t[2] > budget),
        "timeline": x["timeline"],
    }


# --- output --------------------------------------------------------------------------------------


def format_table(rows: Sequence[dict]) -> str:
    """Plain-text table of the main simulation measures."""
    cols = [
        ("policy", "policy", "{}"),
        ("predictor", "predictor", "{}"),
        ("admission", "admission", "{}"),
        ("preemption", "preemption", "{}"),
        ("decode_steps", "steps", "{}"),
        ("lower_bound", "bound", "{}"),
        ("steps_over_bound", "steps/bound", "{:.3f}"),
        ("peak_kv_tokens", "peak_kv", "{}"),
        ("peak_kv_vs_full", "kv/full", "{:.3f}"),
        ("peak_concurrency", "peak_conc", "{}"),
        ("mean_concurrency", "mean_conc", "{:.1f}"),
        ("kv_over_budget_steps", "over_budget", "{}"),
        ("preemptions", "preempt", "{}"),
        ("recomputed_tokens", "recomputed", "{}"),
        ("engine_kv_lower_bound", "block_bound", "{}"),
        ("predictor_mae", "mae", "{:.1f}"),
        ("overhead_s", "sched_s", "{:.3f}"),
    ]
    cells = [[h for _, h, _ in cols]] + [["-" if r.get(k) is None else f.format(r[k]) for k, _, f in cols]
                                         for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def format_rows(rows: list[dict], mode: str) -> str:
    if mode == "simulate":
        return format_table(rows)
    cols = [("policy", "{}"), ("predictor", "{}"), ("admission", "{}"), ("preemption", "{}"),
            ("decode_steps", "{}"), ("lower_bound", "{}"),
            ("steps_over_bound", "{:.2f}"), ("peak_kv_tokens", "{}"),
            ("engine_peak_kv_tokens", "{}"), ("kv_budget_tokens", "{}"), ("slots", "{}"),
            ("peak_concurrency", "{}"), ("tokens_per_s", "{:.0f}"), ("wall_s", "{:.1f}"),
            ("engine_over_budget_steps", "{}"), ("preemptions", "{}"), ("recomputed_tokens", "{}"),
            ("engine_kv_lower_bound", "{}"), ("predictor_mae", "{:.1f}"), ("prompt_encoder_s", "{:.2f}"),
            ("overhead_s", "{:.3f}"), ("overhead_frac", "{:.2%}")]
    cells = [[c for c, _ in cols]] + [["-" if r.get(c) is None else f.format(r[c]) for c, f in cols]
                                      for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells]
    return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:])


def save_plot(out: dict, path: str) -> None:
    """Bars of steps (with the bound), peak KV (own, engine) and throughput; in real mode also
    the KV held over the decode steps of each policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = out["rows"]
    labels = [r["policy"] + ("" if r["predictor"] == "-" else f"\n{r['predictor']}")
              + ("" if r.get("admission", "-") == "-" else f"\n{r['admission']}") for r in rows]
    real_mode = out["mode"] == "real"
    fig, axes = plt.subplots(1, 4 if real_mode else 2, figsize=(20 if real_mode else 11, 4.2))
    x = range(len(rows))
    ax = axes[0]
    ax.bar(x, [r["decode_steps"] for r in rows], color="tab:blue", label="decode steps")
    ax.scatter(x, [r["lower_bound"] for r in rows], color="k", marker="_", s=600, label="lower bound")
    ax.set_title("decode steps"), ax.legend(fontsize=8)
    ax = axes[1]
    ax.bar([i - 0.2 for i in x], [r["peak_kv_tokens"] for r in rows], 0.4, label="own accounting")
    if real_mode:
        ax.bar([i + 0.2 for i in x], [r["engine_peak_kv_tokens"] or 0 for r in rows], 0.4,
               label="engine (blocks in use)")
        ax.axhline(out["kv_budget_tokens"], color="r", ls="--", lw=1, label="budget C")
    ax.set_title("peak KV tokens"), ax.legend(fontsize=8)
    for a in axes[:2]:
        a.set_xticks(list(x), labels, fontsize=7)
    if real_mode:
        ax = axes[2]
        ax.bar(x, [r["tokens_per_s"] for r in rows], color="tab:green")
        ax.set_xticks(list(x), labels, fontsize=7), ax.set_title("generated tokens / s")
        ax = axes[3]
        for r, lab in zip(rows, labels):
            t = r["timeline"]
            ax.plot([s[0] for s in t], [s[2] for s in t], lw=1, label=lab.replace("\n", " "))
        ax.axhline(out["kv_budget_tokens"], color="r", ls="--", lw=1)
        ax.set_xscale("log"), ax.set_xlabel("decode step"), ax.set_title("engine KV tokens in use")
        ax.legend(fontsize=7)
    title = (f"{out.get('model', '')} B={out.get('prompts')} G={out.get('group_size')}" if real_mode
             else f"simulation: {out['trace']} ({out['sequences']} seqs, S={out['slots']})")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
