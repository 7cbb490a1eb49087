"""python -m rl.plan: architecture, layout and memory plan, without Ray, GPUs or a hub.

- the plan's numbers for a tiny config equal a hand count;
- the built-in table gives the published parameter counts;
- the CLI runs on configs/gpu/*.yaml and the quickstart with nothing but the config, and warns
  with numbers when a config will not fit;
- (slow) the learner estimate against the measured peak of a real CPU learner process.

This file is also the measuring script (`python tests/test_plan.py measure ...`), so that the
same code measures a CPU learner's peak RSS here and a GPU learner's peak allocation on a GPU
machine (docs/CLUSTER.md has both).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

from rl.config import load_config  # noqa: E402
from rl.errors import ConfigError  # noqa: E402
from rl.plan import BUILTIN_MODELS, GIB, find_architecture, format_plan, main, plan_config  # noqa: E402


def _items(actor) -> dict[str, int]:
    return {i.label: i.bytes for i in actor.items}


def test_tiny_plan_equals_hand_count(tiny_model_dir):
    c = load_config(None, [f"model.path={tiny_model_dir}", "data.max_prompt_tokens=32", "rollout.max_new_tokens=32",
                           "data.prompts_per_step=2", "rollout.group_size=4", "learner.micro_batch_tokens=128",
                           "learner.layout=padded", "rollout.gpu_memory_utilization=0.01"])
    plan = plan_config(c, "cpu")
    a = plan.model
    # conftest's tiny model: Qwen2 (q/k/v biases), hidden 64, 2 layers, 2 heads / 1 KV head of 32,
    # MLP 128, tied embeddings, the tokenizer's 450 tokens
    assert (a.hidden, a.layers, a.heads, a.kv_heads, a.head_dim, a.intermediate, a.vocab) == (64, 2, 2, 1, 32, 128, 450)
    assert a.tied_embeddings and a.qkv_bias and not a.qk_norm
    layer = (64 * 64 + 64) + (64 * 32 + 32) * 2 + 64 * 64 + 3 * 64 * 128 + 2 * 64  # q, k, v (+bias), o, MLP, norms
    params = 450 * 64 + 2 * layer + 64  # embeddings (tied), layers, final norm
    assert layer == 37120 and params == 103104
    assert a.params == params == a.formula_params()  # counted in the safetensors = the formula
    from transformers import AutoModelForCausalLM

    assert sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters()) == params

    L = _items(plan.learner)
    assert L["weights (fp32 masters)"] == 4 * params
    assert L["gradients (fp32)"] == 4 * params
    assert L["AdamW state (fp32 exp_avg + exp_avg_sq)"] == 8 * params
    matmul = 2 * (64 * 64 + 64 * 32 * 2 + 64 * 64 + 3 * 64 * 128) + 450 * 64  # linear layers + the (tied) head
    assert L["16-bit copies of the weights (autocast cache, kept for backward)"] == 2 * matmul
    # micro-batch: T = 128 tokens (the budget; a rank has 2 x 4 x 64 = 512), S = 64, eager, bf16 (a = 2)
    per_token_layer = (16 * 64          # RMSNorm inputs and outputs, fp32
                       + 5 * 2 * 64     # 16-bit casts into q, k, v, gate, up
                       + 4 * 2 * 64     # rotated q, repeated k and v, o_proj input (q = 64)
                       + 6 * 2 * 64     # softmax probabilities fp32 + bf16: 6 B x heads x S
                       + 4 * 2 * 128)   # gate, up, silu(gate), product
    assert per_token_layer == 3968
    assert L["activations, micro-batch (2 layers)"] == 128 * 2 * per_token_layer
    K = 64  # response tokens of a 128-token micro-batch of 32 + 32-token sequences
    assert L["activations: final norm and chunked head"] == 8 * 64 * 128 + 4 * 64 * K + 2 * 450 * K
    assert L["head chunk buffers (transient)"] == 10 * (1 << 22)
    assert plan.learner.total == sum(L.values())

    R = _items(plan.rollout)
    assert plan.kv_bytes_per_token == 2 * 2 * 1 * 32 * 2  # K and V x layers x KV heads x head_dim x bf16
    assert R["weights (bfloat16)"] == 2 * params
    assert plan.device == "cpu" and plan.per_device[0][1] == plan.rollout.total


# Parameter counts the model cards publish (billions), against the table's architectures.
PUBLISHED = {"Qwen/Qwen3-0.6B": 0.596, "Qwen/Qwen3-1.7B": 1.72, "Qwen/Qwen3-4B": 4.02, "Qwen/Qwen3-8B": 8.19,
             "meta-llama/Llama-3.2-1B": 1.236, "meta-llama/Llama-3.2-3B": 3.213, "meta-llama/Llama-3.1-8B": 8.03,
             "HuggingFaceTB/SmolLM2-135M": 0.1345, "HuggingFaceTB/SmolLM2-360M": 0.3618,
             "HuggingFaceTB/SmolLM2-1.7B": 1.711}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_builtin_table_parameter_counts(name):
    arch = BUILTIN_MODELS[name]
    assert abs(arch.formula_params() / 1e9 - PUBLISHED[name]) / PUBLISHED[name] < 0.005
    if name.startswith("Qwen/"):
        assert arch.head_dim == 128 and arch.qk_norm


def test_model_names_resolve_without_a_hub(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache: the table answers
    assert find_architecture("Qwen/Qwen3-1.7B").name == "Qwen/Qwen3-1.7B"
    assert find_architecture("meta-llama/Llama-3.2-1B-Instruct").name == "meta-llama/Llama-3.2-1B"
    monkeypatch.setenv("RL_CACHE_DIR", str(tmp_path))  # demo model not converted here
    assert find_architecture("demo:SmolLM2-135M-Instruct").name == "HuggingFaceTB/SmolLM2-135M"
    with pytest.raises(ConfigError, match="does not know its architecture"):
        find_architecture("someone/unknown-model-7B")


@pytest.mark.parametrize("config", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs" / "gpu").glob("*.yaml")))
def test_cli_on_gpu_configs_starts_nothing(config):
    """The command runs with the config alone: no Ray imported, no hub reached."""
    code = ("import sys, runpy; sys.argv = ['rl.plan', %r, '--gpus', '1'];\n"
            "try:\n    runpy.run_module('rl.plan', run_name='__main__')\nexcept SystemExit as e:\n    rc = e.code\n"
            "print('RAY_IMPORTED', 'ray' in sys.modules, 'VLLM_IMPORTED', 'vllm' in sys.modules); sys.exit(rc)" % config)
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "RAY_IMPORTED False VLLM_IMPORTED False" in out
    assert "Qwen/Qwen3-1.7B: 1.721 B parameters" in out and "H100-80GB" in out
    assert "learner actor x" in out and "rollout actor x" in out and "KV cache" in out


def test_qwen3_1gpu_numbers():
    c = load_config(ROOT / "configs/gpu/qwen3_1.7b_1gpu.yaml")
    plan = plan_config(c, "H100-80GB", gpus=1)
    assert plan.rollout.gpu_share == plan.learner.gpu_share == 0.5
    assert plan.kv_bytes_per_token == 2 * 28 * 8 * 128 * 2 == 114688
    L = _items(plan.learner)
    P = plan.model.params
    assert L["AdamW state (fp32 exp_avg + exp_avg_sq)"] == 8 * P
    # fp32 masters + gradients + AdamW: 16 B/param, the config comment's "~27 GB"
    assert 27.0 < 16 * P / 1e9 < 28.0
    assert plan.device_total <= plan.device_bytes and not plan.warnings
    text = format_plan(plan)
    assert "fits" in text and "gradient checkpointing on" in text


def test_warns_with_numbers_when_it_does_not_fit():
    c = load_config(ROOT / "configs/gpu/qwen3_1.7b_1gpu.yaml",
                    ["model.path=Qwen/Qwen3-8B", "learner.gradient_checkpointing=false", "learner.layout=padded"])
    plan = plan_config(c, "A100-40GB")  # 2 GPUs: one each
    assert any("a learner actor needs" in w and "GiB" in w and "gradient_checkpointing" in w for w in plan.warnings)
    assert "WARNING" in format_plan(plan)


def test_warns_about_kv_budget_and_unschedulable_fractions():
    c = load_config(ROOT / "configs/gpu/qwen3_1.7b_1gpu.yaml", ["rollout.scheduler.kv_budget_tokens=10000000"])
    assert any("kv_budget_tokens = 10,000,000" in w for w in plan_config(c, "H100-80GB").warnings)
    c = load_config(ROOT / "configs/gpu/qwen3_1.7b_1gpu.yaml", ["rollout.workers=2"])
    plan = plan_config(c, "H100-80GB", gpus=2)  # 3 actors ask 2/3 GPU each: 2 GPUs hold 2 of them
    assert any("Ray would wait forever" in w for w in plan.warnings)


def test_lora_trains_only_adapters():
    c = load_config(ROOT / "configs/gpu/qwen3_1.7b_1gpu.yaml", ["model.lora.rank=16"])
    L = _items(plan_config(c, "H100-80GB").learner)
    arch = BUILTIN_MODELS["Qwen/Qwen3-1.7B"]
    per_layer = 16 * ((2048 + 2048) + (2048 + 1024) * 2 + (2048 + 2048) + (2048 + 6144) * 2 + (6144 + 2048))
    assert arch.lora_params(16, list(c.model.lora.target_modules)) == 28 * per_layer
    assert L["AdamW state (fp32 exp_avg + exp_avg_sq)"] == 8 * 28 * per_layer
    assert L["weights (fp32 masters)"] == 4 * arch.params  # the frozen base stays fp32 in the learner


def test_main_reports_config_errors(capsys):
    assert main(["configs/gpu/qwen3_1.7b_1gpu.yaml", "--gpu", "A100"]) == 2  # ambiguous
    assert "A100-40GB, A100-80GB" in capsys.readouterr().err
    assert main(["configs/quickstart.yaml", "learner.lr=-1"]) == 2
    assert main(["configs/quickstart.yaml", "--gpu", "cpu", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["device"] == "cpu" and d["learner"]["total"] > 0


# --- the estimate against a measured learner -------------------------------------------------

def measure(model_dir: str, sections: dict, prompts: int, group: int, prompt_len: int, response_len: int,
            warm_dir: str | None = None) -> dict:
    """Peak memory of a real Learner over two updates on a batch of `prompts` x `group` sequences,
    and the plan's estimate for the same config. CPU: peak RSS (ru_maxrss) above the RSS after a
    warm-up learner (imports, allocator) was built and dropped; GPU: torch.cuda.max_memory_allocated.
    `sections`: config sections as plain dicts (built without OmegaConf, so it runs where only
    torch and transformers are installed)."""
    import dataclasses
    import gc
    import random
    import resource

    import torch

    from rl.config import Config, DataConfig, LearnerConfig, LoraConfig, ModelConfig, RolloutConfig
    from rl.learner import Learner, TrainBatch

    model = dict(sections.get("model", {}))
    lora = LoraConfig(**model.pop("lora", {}))
    c = Config(model=ModelConfig(path=model_dir, lora=lora, **model),
               data=DataConfig(max_prompt_tokens=prompt_len, prompts_per_step=prompts, **sections.get("data", {})),
               rollout=RolloutConfig(group_size=group, max_new_tokens=response_len, **sections.get("rollout", {})),
               learner=LearnerConfig(**sections.get("learner", {})))
    cuda = torch.cuda.is_available()

    def build(path):
        return Learner(dataclasses.replace(c.model, path=path), c.learner, c.objective,
                       temperature=c.rollout.temperature, seed=0, num_threads=None if cuda else 2)

    if warm_dir:
        build(warm_dir)
        gc.collect()
    import psutil

    # Peak from here on only: reset the kernel's high-water mark (VmHWM) so that what the imports
    # and the warm-up held at their peak does not count (ru_maxrss cannot be reset).
    hwm_reset = _reset_peak_rss()
    baseline = psutil.Process().memory_info().rss
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    learner = build(model_dir)
    vocab = learner.policy.hf_config.vocab_size
    rng = random.Random(0)
    prompt_ids, response_ids = [], []
    for _ in range(prompts):
        p = [rng.randrange(3, vocab) for _ in range(prompt_len)]
        for _ in range(group):
            prompt_ids.append(p)
            response_ids.append([rng.randrange(3, vocab) for _ in range(response_len)])
    n = len(response_ids)
    batch = TrainBatch(prompt_ids, response_ids, [[rng.choice([-1.0, 1.0])] * response_len for _ in range(n)],
                       [[-1.0] * response_len for _ in range(n)], float(n * response_len), float(n), float(response_len))
    metrics = {}
    for _ in range(2):  # the second step has the AdamW state from the start: the steady peak
        metrics, _ = learner.update(batch)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        reserved = torch.cuda.max_memory_reserved()
    else:
        high = _peak_rss() if hwm_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak = high - baseline
        reserved = peak
    from rl.plan import CUDA_CONTEXT_BYTES, plan_config

    plan = plan_config(c, "H200-141GB" if cuda else "cpu")
    estimate = plan.learner.total - (CUDA_CONTEXT_BYTES if cuda else 0)  # torch does not count the context
    del learner
    gc.collect()
    return {"measured": peak, "reserved": reserved, "estimate": estimate, "ratio": estimate / peak,
            "micro_batches": metrics.get("train/micro_batches"), "params": plan.model.params,
            "formula_params": plan.model.formula_params(), "items": {i.label: i.bytes for i in plan.learner.items}}


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM (Linux: write 5 to /proc/self/clear_refs); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    """VmHWM of this process in bytes (the peak resident set since the last reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


CPU_CASES = {
    "padded": {"learner": {"layout": "padded"}},
    "padded, gradient checkpointing": {"learner": {"layout": "padded", "gradient_checkpointing": True}},
    "shared_prompt": {"learner": {"layout": "shared_prompt"}},
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CPU_CASES))
def test_estimate_vs_measured_cpu_learner(case, tiny_model_dir, tmp_path_factory):
    """A real CPU learner process (the tiny model's architecture, widened to 512 so that the
    model and its activations, ~0.4-1 GiB, stand well above the allocator's noise): its peak
    RSS over two updates of 4096-token micro-batches against the plan. The tolerance reached
    (docs/CLUSTER.md): the estimate was within -6%..+3% of the measured peak."""
    from rl.tiny_model import build_tiny_model

    wide = tmp_path_factory.getbasetemp() / "plan_wide_512"
    if not (wide / "config.json").exists():
        build_tiny_model(wide, hidden_size=512, num_layers=4)
    sections = dict(CPU_CASES[case], learner={**CPU_CASES[case]["learner"], "micro_batch_tokens": 4096})
    # 4 prompts x 8 samples x 256 tokens: two micro-batches, so that the second one's forward runs
    # with the first one's gradients allocated, as in every real step (many micro-batches)
    args = json.dumps({"model_dir": str(wide), "sections": sections, "prompts": 4, "group": 8, "prompt_len": 64,
                       "response_len": 192, "warm_dir": tiny_model_dir})
    # Large blocks straight from mmap, returned on free: RSS then follows the live tensors.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_ARENA_MAX="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, __file__, "measure", args], capture_output=True, text=True,
                          timeout=600, env=env, cwd=ROOT)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("MEASURED ")), None)
    assert line, proc.stderr[-3000:]
    r = json.loads(line[len("MEASURED "):])
    print(f"{case}: measured {r['measured'] / GIB:.3f} GiB, estimate {r['estimate'] / GIB:.3f} GiB, "
          f"ratio {r['ratio']:.2f}")
    assert r["micro_batches"] == 2.0
    assert 0.85 <= r["ratio"] <= 1.10, r


def build_random_model(name: str, out: str) -> None:
    """A random model of a built-in architecture (bf16 safetensors + config.json), on the GPU
    when there is one: what the GPU measurement trains, no hub needed."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    a = BUILTIN_MODELS[name]
    cls = Qwen3Config if a.qk_norm else LlamaConfig
    cfg = cls(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
              num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
              head_dim=a.head_dim, tie_word_embeddings=a.tied_embeddings, max_position_embeddings=40960,
              pad_token_id=0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    counted = find_architecture(out)
    print(f"BUILT {name}: {counted.params:,} parameters in the safetensors, {a.formula_params():,} by the table")


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "measure":
    kwargs = json.loads(sys.argv[2])
    print("MEASURED " + json.dumps(measure(**kwargs)), flush=True)
elif __name__ == "__main__" and len(sys.argv) > 3 and sys.argv[1] == "build-random":
    build_random_model(sys.argv[2], sys.argv[3])


def test_kv_budget_auto_sizes_the_planned_kv_cache():
    # Qwen3-1.7B recipe: 16 prompts x G 16 x (512 + 4096) tokens, half of it = 589,824 tokens
    c = load_config(ROOT / "configs/gpu/qwen3_1.7b_1gpu.yaml", ["rollout.scheduler.kv_budget_tokens=auto",
                                                                 "rollout.scheduler.kv_budget_fraction=0.5"])
    assert c.rollout.scheduler.budget_per_worker == 589_824
    plan = plan_config(c, "H100-80GB")
    item = next(i for i in plan.rollout.items if i.label.startswith("KV cache"))
    assert item.label == "KV cache (rollout.scheduler.kv_budget_tokens)" and "589,824 tokens" in item.formula
    assert item.bytes == 589_824 * plan.kv_bytes_per_token
    assert any("kv_budget_tokens = 589,824" in w for w in plan.warnings)  # more than 0.35 of the GPU leaves
