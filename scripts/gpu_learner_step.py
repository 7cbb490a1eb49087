"""One-shot check of the learner's GPU path: rl.learner.Learner on CUDA, as the trainer runs it.

For a random-init Qwen3-like model (no hub needed), run real `Learner.update` steps (bf16
autocast over fp32 masters, sdpa attention, fused AdamW on CUDA) in the shared_prompt and
padded layouts, with and without LoRA, then export the weights for sync (flat buffer) and
write a Hugging Face checkpoint and load it back. Prints one row per case: seconds per
update, trained tokens/s, achieved TFLOP/s (6 x parameters x processed tokens, plus
attention) and peak GPU memory; writes JSON to $OUT when set.

    python3 scripts/gpu_learner_step.py [--model qwen3-0.6b|qwen3-1.7b] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

ARCHS = {  # hidden, layers, heads, kv heads, intermediate, vocab
    "qwen3-0.6b": (1024, 28, 16, 8, 3072, 151936),
    "qwen3-1.7b": (2048, 28, 16, 8, 6144, 151936),
    "tiny": (64, 2, 4, 2, 128, 1024),  # --cpu-smoke: checks this script itself, on a CPU
}
CUDA = torch.cuda.is_available()


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def build_model_dir(arch: str, out: Path) -> Path:
    from transformers import AutoModelForCausalLM, Qwen3Config

    from rl.tiny_model import build_tokenizer

    hidden, layers, heads, kv, inter, vocab = ARCHS[arch]
    config = Qwen3Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab, head_dim=128,
                         tie_word_embeddings=True, max_position_embeddings=4096)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    build_tokenizer(out)  # a small tokenizer for the checkpoint round trip (ids stay < vocab)
    return out


def make_batch(vocab: int, groups: int, group_size: int, prompt_len: int, response_len: int, seed: int):
    from rl.learner import TrainBatch

    gen = torch.Generator().manual_seed(seed)
    prompts, responses = [], []
    for _ in range(groups):
        prompt = torch.randint(10, vocab, (prompt_len,), generator=gen).tolist()
        for _ in range(group_size):
            n = int(torch.randint(response_len // 4, response_len + 1, (1,), generator=gen))
            prompts.append(prompt)
            responses.append(torch.randint(10, vocab, (n,), generator=gen).tolist())
    adv = [torch.randn(len(r), generator=gen).tolist() for r in responses]
    lps = [(-torch.rand(len(r), generator=gen)).tolist() for r in responses]
    n_tok = float(sum(map(len, responses)))
    return TrainBatch(prompts, responses, adv, lps, n_tok, float(len(responses)), float(response_len))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen3-0.6b", choices=sorted(ARCHS))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--response-len", type=int, default=512)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU (tests this script)")
    args = ap.parse_args()
    if args.cpu_smoke:
        args.model, args.steps, args.groups, args.group_size, args.prompt_len, args.response_len = "tiny", 1, 2, 2, 8, 8

    from rl.config import BehaviorCorrectionConfig, LearnerConfig, LoraConfig, ModelConfig, ObjectiveConfig
    from rl.learner import Learner

    assert CUDA or args.cpu_smoke, "this check needs a CUDA GPU (or --cpu-smoke)"
    print("device:", torch.cuda.get_device_name() if CUDA else "cpu", "| torch", torch.__version__)
    tmp = Path(tempfile.mkdtemp())
    path = build_model_dir(args.model, tmp / "model")
    rows = []
    cases = [("shared_prompt", 0), ("padded", 0), ("shared_prompt", 16)]
    for layout, lora_rank in cases:
        model = ModelConfig(path=str(path), dtype="bfloat16",
                            lora=LoraConfig(rank=lora_rank, alpha=2.0 * lora_rank if lora_rank else 32.0))
        # the batch's behavior log-probs are placeholders: no off-policy correction
        learner_cfg = LearnerConfig(layout=layout, micro_batch_tokens=16384, lr=1e-6,
                                    behavior_correction=BehaviorCorrectionConfig(mode="none"))
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        learner = Learner(model, learner_cfg, ObjectiveConfig(name="grpo"), num_threads=8)
        n_params = sum(p.numel() for p in learner.policy.net.parameters())
        times, metrics = [], {}
        for step in range(args.steps + 1):  # the first is warm-up (allocator, kernels)
            batch = make_batch(learner.policy.hf_config.vocab_size, args.groups, args.group_size,
                               args.prompt_len, args.response_len, seed=step)
            _sync()
            t0 = time.perf_counter()
            metrics, _ = learner.update(batch)
            _sync()
            if step:
                times.append(time.perf_counter() - t0)
        seconds = sum(times) / len(times)
        processed = metrics["train/processed_tokens"]
        # 2 FLOPs per parameter per token forward, x3 with backward (LoRA: the frozen base
        # still runs forward and backward through activations, so the same count is a fair
        # upper bound); attention scores add 2 x 2 x layers x hidden x context per token.
        hidden, layers = learner.policy.hf_config.hidden_size, learner.policy.hf_config.num_hidden_layers
        ctx = args.prompt_len + args.response_len / 2
        flops = 3 * processed * (2 * n_params + 4 * layers * hidden * ctx)
        t0 = time.perf_counter()
        flat = learner.export_flat_weights()
        _sync()
        export_s = time.perf_counter() - t0
        ckpt = tmp / f"ckpt_{layout}_{lora_rank}"
        t0 = time.perf_counter()
        learner.save_checkpoint(str(ckpt), str(path))
        save_s = time.perf_counter() - t0
        from transformers import AutoModelForCausalLM
        reloaded = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
        assert reloaded.config.num_hidden_layers == layers
        row = {"model": args.model, "layout": layout, "lora_rank": lora_rank, "params_M": n_params / 1e6,
               "update_s": seconds, "processed_tokens": processed,
               "tokens_per_s": processed / seconds, "tflops": flops / seconds / 1e12,
               "loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
               "padding_fraction": metrics["train/padding_fraction"],
               "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if CUDA else 0.0,
               "export_s": export_s, "export_bytes": flat.nbytes,
               "checkpoint_s": save_s}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del learner, reloaded
        if CUDA:
            torch.cuda.empty_cache()
    size = 8192 if CUDA else 512
    a = torch.randn(size, size, device="cuda" if CUDA else "cpu", dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    _sync()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ a
    _sync()
    matmul_tflops = 10 * 2 * size**3 / (time.perf_counter() - t0) / 1e12
    print(f"bf16 {size}^3 matmul: {matmul_tflops:.1f} TFLOP/s")
    for r in rows:
        r["mfu_vs_measured_matmul"] = r["tflops"] / matmul_tflops
        print(f"{r['layout']:>13} lora={r['lora_rank']:<3} update {r['update_s']:.3f}s  "
              f"{r['tokens_per_s']:,.0f} tok/s  {r['tflops']:.1f} TFLOP/s ({100 * r['mfu_vs_measured_matmul']:.1f}% of matmul)  "
              f"peak {r['peak_gpu_gb']:.1f} GiB  pad {100 * r['padding_fraction']:.1f}%  export {r['export_s']:.2f}s")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_learner_step.json").write_text(
            json.dumps({"rows": rows, "matmul_tflops": matmul_tflops}, indent=1))


if __name__ == "__main__":
    main()
