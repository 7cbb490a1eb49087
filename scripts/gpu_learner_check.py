"""One-shot learner check on an NVIDIA GPU: chunked vs full-logits response log-probs.

For a Qwen3-1.7B-shaped and a SmolLM2-135M-shaped model (random init from a transformers
config, fp32 master weights, bf16 autocast, SDPA attention), on one micro-batch of 8
sequences x (256 prompt + 512 response) tokens:

  - forward + backward seconds of `response_logprobs` + a weighted-sum loss, for the full
    logits path and the chunked head (backward "stored" and "recompute"), and the values'
    agreement (max |diff| of log-probs, entropies; relative diff of the head weight's grad)
  - learner TFLOP/s and MFU (rl.perf.learner_flops against rl.perf.peak_tflops('cuda', bf16))
  - peak memory above the weights (torch.cuda.max_memory_allocated)
  - the head alone (hidden [4096, H] -> log-probs) for the same variants
  - a float32 (TF32 off) check that the chunked head equals the full path on the GPU
  - one measured 8192^3 bf16 matmul rate

Needs torch + transformers only (no ray, vllm or omegaconf). Prints a table and writes
gpu_learner_check.json to $OUT when set. About 1-2 minutes on an H200.

    python3 scripts/gpu_learner_check.py              # on the GPU machine, from the repo root
    python3 scripts/gpu_learner_check.py --cpu-smoke  # tiny configs on CPU, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from rl import logprobs as lp  # noqa: E402
from rl import perf  # noqa: E402

VARIANTS = (("full", dict(chunked=False)), ("stored", dict(chunked=True, backward="stored")),
            ("recompute", dict(chunked=True, backward="recompute")))


def model_configs(smoke: bool) -> dict:
    from transformers import LlamaConfig, Qwen3Config

    if smoke:
        return {"tiny-qwen3": Qwen3Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, head_dim=16, intermediate_size=128,
                                          vocab_size=1000, tie_word_embeddings=True),
                "tiny-llama": LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=128, vocab_size=777,
                                          tie_word_embeddings=True)}
    return {
        "qwen3-1.7b": Qwen3Config(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16,
                                  num_key_value_heads=8, head_dim=128, intermediate_size=6144,
                                  vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096,
                                  rope_theta=1000000.0),
        "smollm2-135m": LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                                    num_key_value_heads=3, head_dim=64, intermediate_size=1536,
                                    vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=4096,
                                    rope_theta=100000.0),
    }


class Clock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self):
        if self.cuda:
            self.sync()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        return 0

    def peak_above(self, base: int) -> float:
        return (torch.cuda.max_memory_allocated() - base) / 2**30 if self.cuda else float("nan")


def build_model(config, device: torch.device):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    return model.to(device).train()


def micro_batch(vocab: int, n: int, prompt: int, response: int, device: torch.device):
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, vocab, (n, prompt), generator=gen).tolist()
    responses = torch.randint(0, vocab, (n, response), generator=gen).tolist()
    mb = lp.make_micro_batch(prompts, responses, pad_id=0)
    for name in ("input_ids", "attention_mask", "position_ids", "response_ids", "response_mask"):
        setattr(mb, name, getattr(mb, name).to(device))
    adv = torch.randn(n, response, generator=gen).to(device)
    return mb, adv, [prompt] * n, [response] * n


def step(model, mb, adv, kwargs, autocast_device: str):
    """One forward + backward; returns (log-probs, entropies), detached."""
    lp.HEAD_BACKWARD = kwargs.get("backward", "auto")
    with torch.autocast(autocast_device, dtype=torch.bfloat16):
        logp, ent = lp.response_logprobs(model, mb, 1.0, with_entropy=True, chunked=kwargs["chunked"])
    loss = (logp * adv).sum() / mb.response_mask.sum()
    loss.backward()
    return logp.detach(), ent


def time_model(name, config, device, clock, args) -> list[dict]:
    t0 = time.perf_counter()
    model = build_model(config, device)
    build_s = time.perf_counter() - t0
    mb, adv, prompt_lens, response_lens = micro_batch(config.vocab_size, args.sequences, args.prompt,
                                                      args.response, device)
    flops = perf.learner_flops(config, prompt_lens, response_lens)
    head = model.get_output_embeddings().weight
    rows, ref = [], None
    times = {v: [] for v, _ in VARIANTS}
    outputs, peaks = {}, {}
    for v, kwargs in VARIANTS:  # warm-up, values, gradients, memory
        model.zero_grad(set_to_none=True)
        step(model, mb, adv, kwargs, device.type)  # warm-up
        model.zero_grad(set_to_none=True)
        base = clock.reset_peak()
        logp, ent = step(model, mb, adv, kwargs, device.type)
        peaks[v] = clock.peak_above(base)
        outputs[v] = (logp, ent, head.grad.detach().clone())
    for _ in range(args.repeats):  # interleaved timing
        for v, kwargs in VARIANTS:
            model.zero_grad(set_to_none=True)
            clock.sync()
            t = time.perf_counter()
            step(model, mb, adv, kwargs, device.type)
            clock.sync()
            times[v].append(time.perf_counter() - t)
    if args.profile:
        info = profile_variants(model, mb, adv, device, clock)
        for v, r in info.items():
            print(f"--- {name} {v}: profile ({r['wall_s']:.4f} s)\n{perf.format_categories(r)}\n{r['top']}")
    ref = outputs["full"]
    mask = mb.response_mask
    for v, _ in VARIANTS:
        logp, ent, g = outputs[v]
        sec = statistics.median(times[v])
        rows.append({
            "model": name, "part": "model fwd+bwd", "variant": v, "seconds": sec,
            "seconds_all": times[v], "tflops": perf.tflops(flops, sec),
            "mfu": perf.mfu(flops, sec, args.peak), "peak_gib_above_weights": peaks[v],
            "max_logp_diff": float((logp - ref[0])[mask].abs().max()),
            "max_entropy_diff": float((ent - ref[1])[mask].abs().max()),
            "head_grad_rel_diff": float((g - ref[2]).abs().max() / ref[2].abs().max()),
            "tokens": sum(prompt_lens) + sum(response_lens), "learner_flops": flops,
            "build_seconds": build_s,
        })
    del model, outputs, ref, head
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def profile_variants(model, mb, adv, device, clock) -> dict:
    """One profiled step per variant: time per category and the top ops by self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out = {}
    for v, kwargs in VARIANTS:
        model.zero_grad(set_to_none=True)
        clock.sync()
        with perf.tag_attention(model), profile(activities=activities) as prof:
            t = time.perf_counter()
            step(model, mb, adv, kwargs, device.type)
            clock.sync()
            wall = time.perf_counter() - t
        result = perf.profile_categories(prof, wall)
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        result["top"] = prof.key_averages().table(sort_by=sort, row_limit=12, max_name_column_width=48)
        out[v] = result
    return out


def time_head(name, config, device, clock, args) -> list[dict]:
    """The head + log-softmax alone: hidden [K, H] (fp32, requires grad) and a fp32 weight."""
    K, H, V = args.head_tokens, config.hidden_size, config.vocab_size
    gen = torch.Generator(device=device).manual_seed(2)
    weight = (torch.randn(V, H, generator=gen, device=device) * 0.02).requires_grad_()
    hidden0 = torch.randn(K, H, generator=gen, device=device)
    targets = torch.randint(0, V, (K,), generator=gen, device=device)
    up = torch.randn(K, generator=gen, device=device)

    def run(v):
        hidden = hidden0.clone().requires_grad_()
        weight.grad = None
        with torch.autocast(device.type, dtype=torch.bfloat16):
            if v == "full":
                logp, _ = lp._token_logprobs(torch.nn.functional.linear(hidden, weight), targets, 1.0, True)
            else:  # "stored" or "recompute", optionally "@<log2 chunk elements>"
                mode, _, budget = v.partition("@")
                chunk = max(1, (1 << int(budget)) // V) if budget else None
                logp, _ = lp.chunked_head_logprobs(hidden, weight, targets, 1.0, True, backward=mode,
                                                   chunk_tokens=chunk,
                                                   chunk_vocab=max(1, (1 << int(budget)) // K) if budget else None)
        (logp * up).sum().backward()
        return logp.detach()

    flops = 3 * K * perf.lm_head_flops_per_token(config)
    variants = ["full", "stored", "recompute"] + [f"{m}@{b}" for b in args.sweep for m in ("stored", "recompute")]
    rows, times, peaks = [], {v: [] for v in variants}, {}
    for v in variants:
        run(v)
        base = clock.reset_peak()
        run(v)
        peaks[v] = clock.peak_above(base)
    for _ in range(args.repeats):
        for v in variants:
            clock.sync()
            t = time.perf_counter()
            run(v)
            clock.sync()
            times[v].append(time.perf_counter() - t)
    for v in variants:
        sec = statistics.median(times[v])
        rows.append({"model": name, "part": f"head {K} tok", "variant": v, "seconds": sec,
                     "seconds_all": times[v], "tflops": perf.tflops(flops, sec),
                     "mfu": perf.mfu(flops, sec, args.peak), "peak_gib_above_weights": peaks[v]})
    return rows


def fp32_check(device: torch.device) -> dict:
    """float32 (TF32 off): chunked head == full path, values and gradients, on this device."""
    old_tf32 = torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    try:
        gen = torch.Generator(device=device).manual_seed(3)
        K, H, V = 333, 64, 5003
        hidden = torch.randn(K, H, generator=gen, device=device).requires_grad_()
        weight = (torch.randn(V, H, generator=gen, device=device) * 0.3).requires_grad_()
        targets = torch.randint(0, V, (K,), generator=gen, device=device)
        up = torch.randn(K, generator=gen, device=device)
        ref, ref_ent = lp._token_logprobs(hidden @ weight.t(), targets, 0.7, True)
        ref_g = torch.autograd.grad((ref * up).sum(), [hidden, weight])
        out = {}
        for mode in ("stored", "recompute"):
            got, ent = lp.chunked_head_logprobs(hidden, weight, targets, 0.7, True, chunk_tokens=100,
                                                chunk_vocab=1000, backward=mode)
            g = torch.autograd.grad((got * up).sum(), [hidden, weight])
            got, ref = got.detach(), ref.detach()
            out[mode] = {"logp": float((got - ref).abs().max()), "entropy": float((ent - ref_ent).abs().max()),
                         "grad_hidden": float((g[0] - ref_g[0]).abs().max()),
                         "grad_weight": float((g[1] - ref_g[1]).abs().max())}
        out["ok"] = all(v < 1e-5 for m in ("stored", "recompute") for v in out[m].values())
        return out
    finally:
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = old_tf32


def matmul_rate(device: torch.device, n: int, clock: Clock) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        torch.mm(a, b)
    clock.sync()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(10):
            torch.mm(a, b)
        clock.sync()
        best = min(best, (time.perf_counter() - t) / 10)
    return 2 * n ** 3 / best / 1e12


def print_rows(rows: list[dict]) -> None:
    cols = ("model", "part", "variant", "seconds", "tflops", "mfu", "peak_gib_above_weights",
            "max_logp_diff", "max_entropy_diff", "head_grad_rel_diff")
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    table = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for t in table:
        print("  ".join(x.ljust(w) for x, w in zip(t, widths)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny configs on CPU (checks the script runs)")
    p.add_argument("--models", default="", help="comma-separated subset of the model names")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--response", type=int, default=512)
    p.add_argument("--head-tokens", type=int, default=4096)
    p.add_argument("--profile", action="store_true", help="profile one step per variant (categories, top ops)")
    p.add_argument("--sweep", default="", help="head alone: also these chunk sizes, log2 elements (e.g. 24,26,28)")
    args = p.parse_args(argv)
    args.sweep = [int(x) for x in args.sweep.split(",") if x]
    smoke = args.cpu_smoke
    if smoke:
        args.repeats, args.sequences, args.prompt, args.response, args.head_tokens = 1, 2, 8, 16, 64
    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    clock = Clock(device)
    started = time.perf_counter()
    info = {"torch": torch.__version__, "device": str(device),
            "device_name": torch.cuda.get_device_name() if device.type == "cuda" else perf.cpu_model()}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    args.peak = perf.peak_tflops(device.type, torch.bfloat16, probe_seconds=0.5 if smoke else 2.0)
    info["peak_bf16_tflops"] = args.peak
    info["matmul_n"] = 256 if smoke else 8192
    info["matmul_bf16_tflops"] = matmul_rate(device, info["matmul_n"], clock)
    info["fp32_check"] = fp32_check(device)
    print(json.dumps(info), flush=True)
    configs = model_configs(smoke)
    if args.models:
        configs = {k: v for k, v in configs.items() if k in args.models.split(",")}
    rows = []
    for name, config in configs.items():
        rows += time_head(name, config, device, clock, args)
        rows += time_model(name, config, device, clock, args)
        print_rows([r for r in rows if r["model"] == name])
        print(flush=True)
    info["seconds_total"] = time.perf_counter() - started
    print(f"matmul {info['matmul_n']}^3 bf16: {info['matmul_bf16_tflops']:.1f} TFLOP/s "
          f"(peak {args.peak:.1f}); fp32 check ok: {info['fp32_check']['ok']}; "
          f"total {info['seconds_total']:.0f} s")
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "gpu_learner_check.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    return 0 if info["fp32_check"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
