"""rl/perf.py: FLOP counts by hand, the GPU peak table, the CPU probe's cache."""

import json

import pytest
import torch

from rl import perf


def _tiny_config(**kw):
    from transformers import LlamaConfig

    args = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=100)
    args.update(kw)
    return LlamaConfig(**args)


def test_flops_per_token_equals_hand_count():
    # hidden d = 64, 4 query heads and 2 key/value heads of d_h = 64 / 4 = 16, MLP 128, V = 100,
    # 2 layers, sequence length S = 10. Per layer and token (a multiply-add = 2 FLOPs):
    #   q: 64 x (4 * 16) = 4096 MACs   k: 64 x (2 * 16) = 2048   v: 2048   o: (4 * 16) x 64 = 4096
    #      -> 12288 MACs = 24576 FLOPs
    #   scores q k^T and values p v over S / 2 = 5 keys (causal average): 2 x 4 heads x 16 x 5
    #      = 640 MACs = 1280 FLOPs
    #   MLP gate, up, down: 3 x 64 x 128 = 24576 MACs = 49152 FLOPs
    #   layer: 24576 + 1280 + 49152 = 75008; 2 layers: 150016
    #   LM head: 64 x 100 = 6400 MACs = 12800 FLOPs
    # forward: 150016 + 12800 = 162816; training (3x): 488448
    config = _tiny_config()
    assert perf.layer_flops_per_token(config, 10) == 75008
    assert perf.flops_per_token(config, 10) == 162816
    assert perf.flops_per_token(config, 10, lm_head=False) == 150016
    assert perf.flops_per_token(config, 10, training=True) == 488448
    # learner: prompt 6 + response 4 at S = 10, LM head on the 4 response tokens only
    assert perf.learner_flops(config, [6], [4]) == 3 * (10 * 150016 + 4 * 12800)
    assert perf.rollout_flops(config, [6], [4]) == 10 * 150016 + 4 * 12800


def test_flops_per_token_head_dim_and_not_gated():
    # Qwen3-style explicit head_dim (16 heads x 128 = 2048 = hidden here, but taken from config)
    from transformers import Qwen3Config

    c = Qwen3Config(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                    head_dim=128, intermediate_size=6144, vocab_size=151936, tie_word_embeddings=True)
    per_layer = 2 * 2048 * 128 * (2 * 16 + 2 * 8) + 2 * 2 * 16 * 128 * 512 + 2 * 3 * 2048 * 6144
    assert perf.flops_per_token(c, 1024) == 28 * per_layer + 2 * 2048 * 151936
    # about 2 x 1.7e9 parameters' worth per token (+ attention): a sanity check on the scale
    assert 3.0e9 < perf.flops_per_token(c, 1024) < 4.5e9
    gpt2_like = _tiny_config()
    gpt2_like.model_type = "gpt2"  # two MLP matrices
    assert perf.layer_flops_per_token(gpt2_like, 10) == 75008 - 2 * 64 * 128


@pytest.mark.parametrize("name,key", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200"), ("NVIDIA H200 NVL", "H200 NVL"), ("NVIDIA A100-SXM4-40GB", "A100 40GB"),
    ("NVIDIA A100-SXM4-80GB", "A100 80GB"), ("NVIDIA A100 80GB PCIe", "A100 80GB"), ("NVIDIA L40S", "L40S"),
    ("Tesla T4", None)])
def test_gpu_table_key(name, key):
    assert perf.gpu_table_key(name) == key


def test_peak_tflops_uses_the_table_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert perf.peak_tflops("cuda", torch.bfloat16) == 989.4
    assert perf.peak_tflops("cuda:0", "fp16") == 989.4
    assert perf.peak_tflops(torch.device("cuda", 0), torch.float32) == 66.9
    assert perf.peak_tflops("cuda", "tf32") == 494.7
    with pytest.raises(ValueError, match="unknown dtype"):
        perf.peak_tflops("cuda", torch.int8)


def test_cpu_probe_cache_round_trip(monkeypatch, tmp_path):
    monkeypatch.setenv("RL_CACHE_DIR", str(tmp_path))
    calls = []

    def fake_probe(dtype, seconds=2.0, device="cpu", shape=perf.PROBE_SHAPE):
        calls.append(dtype)
        return {torch.bfloat16: 1.5, torch.float32: 0.5}[dtype]

    monkeypatch.setattr(perf, "probe_matmul_tflops", fake_probe)
    assert perf.peak_tflops("cpu", torch.bfloat16) == 1.5
    n = len(perf.PROBE_SHAPES)
    assert calls == [torch.bfloat16] * n + [torch.float32] * n  # every shape per dtype, both cached
    assert perf.peak_tflops("cpu", "float32") == 0.5 and perf.peak_tflops("cpu", "fp16") == 1.5
    assert len(calls) == 2 * n  # from the cache
    stored = json.loads((tmp_path / "peak_tflops.json").read_text())
    key = perf.machine_key("cpu")
    assert key.startswith("cpu:") and f"threads={torch.get_num_threads()}" in key
    assert stored[key]["bf16"] == 1.5 and stored[key]["fp32"] == 0.5
    # another thread count is another machine: probed again, the first entry kept
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads + 7)
    perf.peak_tflops("cpu", torch.bfloat16)
    assert len(calls) == 4 * n and len(json.loads((tmp_path / "peak_tflops.json").read_text())) == 2


def test_probe_measures_a_positive_rate():
    rate = perf.probe_matmul_tflops(torch.float32, seconds=0.05, shape=(64, 32, 48))
    assert 0 < rate < 1000


def test_mfu_and_metrics():
    assert perf.tflops(2e12, 2.0) == 1.0
    assert perf.mfu(2e12, 2.0, peak=4.0) == 0.25
    assert perf.mfu(1.0, 0.0, 1.0) == 0.0
    config = _tiny_config()
    m = perf.learner_metrics(config, [6], [4], seconds=1e-6, peak=10.0)
    flops = 3 * (10 * 150016 + 4 * 12800)
    assert m["perf/learner_tflops"] == pytest.approx(flops / 1e-6 / 1e12)
    assert m["perf/learner_mfu"] == pytest.approx(m["perf/learner_tflops"] / 10.0)
    r = perf.rollout_metrics(config, [6, 3], [4, 2], seconds=2.0, peak=1.0)
    assert r["perf/rollout_tokens_per_s"] == 3.0
    # the second sequence (S = 5) attends to 2.5 keys on average: 2 x 2 x 4 x 16 x 2.5 = 640
    # FLOPs per layer instead of 1280, so 2 x (24576 + 640 + 49152) = 148736 per token
    assert r["perf/rollout_mfu"] == pytest.approx((10 * 150016 + 5 * 148736 + 6 * 12800) / 2.0 / 1e12)


def test_perf_imports_no_cluster_dependencies():
    import subprocess
    import sys

    code = ("import sys; import rl.perf, rl.logprobs, rl.packing; "
            "bad = [m for m in ('ray', 'vllm', 'omegaconf') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("name,ancestors,category", [
    ("aten::mm", (), "gemm"), ("aten::addmm", ("autograd::engine::evaluate_function: AddmmBackward0",), "gemm"),
    ("aten::mm", ("rl.lm_head_logprobs",), "lm_head_logprobs"),
    ("aten::exp", ("rl.lm_head_logprobs.backward",), "lm_head_logprobs"),
    ("aten::_log_softmax", (), "lm_head_logprobs"), ("aten::_softmax", (), "attention"),
    ("aten::_scaled_dot_product_flash_attention", (), "attention"), ("aten::bmm", ("rl.attention",), "attention"),
    ("aten::_foreach_add_", ("Optimizer.step#AdamW.step",), "optimizer"), ("aten::_fused_adamw_", (), "optimizer"),
    ("aten::_to_copy", (), "casts"), ("aten::copy_", (), "casts"), ("c10d::allreduce_", (), "communication"),
    ("nccl:all_reduce", (), "communication"), ("aten::mul", (), "other_ops")])
def test_op_category(name, ancestors, category):
    assert perf.op_category(name, ancestors) == category


def test_profile_categories_on_a_tiny_step(tiny_model_dir):
    """A profiled forward + backward + AdamW step of the tiny model: every category the CPU
    run has is found, self times add up to at most the wall time, fractions to 1."""
    import time

    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM

    from rl.logprobs import make_micro_batch, response_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="eager")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    mb = make_micro_batch([[1, 2, 3, 4]] * 3, [[5, 6, 7]] * 3, 0)
    with perf.tag_attention(model), profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logp, _ = response_logprobs(model, mb, 1.0, with_entropy=True)
        logp.sum().backward()
        opt.step()
        wall = time.perf_counter() - t0
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # hooks removed
    result = perf.profile_categories(prof, wall)
    for cat in ("gemm", "lm_head_logprobs", "attention", "optimizer", "casts"):
        assert result["cpu_s"][cat] > 0, cat
    assert result["cpu_s"]["communication"] == 0
    ops = sum(v for k, v in result["cpu_s"].items() if k != "python_other")
    assert ops <= wall * 1.05  # self times do not overlap
    assert sum(result["cpu_s"].values()) == pytest.approx(max(wall, ops))  # python_other fills the rest
    assert sum(result["cpu_fraction"].values()) == pytest.approx(1.0)
    text = perf.format_categories(result)
    assert "lm_head_logprobs" in text and "wall" in text


def test_gpu_learner_check_cpu_smoke(tmp_path):
    """scripts/gpu_learner_check.py runs end to end on tiny configs (CPU) and writes its JSON."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, OUT=str(tmp_path), RL_CACHE_DIR=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, str(root / "scripts" / "gpu_learner_check.py"), "--cpu-smoke",
                          "--profile"], capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_learner_check.json").read_text())
    assert report["info"]["fp32_check"]["ok"]
    rows = report["rows"]
    assert {r["variant"] for r in rows} == {"full", "stored", "recompute"}
    model_rows = [r for r in rows if r["part"] == "model fwd+bwd"]
    assert len(model_rows) == 6 and all(r["max_logp_diff"] < 1e-4 for r in model_rows)
    assert "lm_head_logprobs" in out.stdout


# --- python -m rl.bench step: MFU and --profile, in-process on the tiny model (no Ray) ---------

def _fake_rollout(vocab: int, groups: int = 3, group_size: int = 4, seed: int = 0):
    import random
    from types import SimpleNamespace

    rng = random.Random(seed)
    samples = []
    for _ in range(groups):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(4, 10))]
        for _ in range(group_size):
            response = [rng.randrange(vocab) for _ in range(rng.randint(2, 12))]
            samples.append(SimpleNamespace(prompt_ids=prompt, response_ids=response,
                                           logprobs=[-1.0] * len(response)))
    return samples


@pytest.fixture
def bench_config(tiny_model_dir, monkeypatch, tmp_path):
    from pathlib import Path

    monkeypatch.setenv("RL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(perf, "probe_matmul_tflops", lambda dtype, seconds=2.0, device="cpu", shape=None: 0.5)
    path = str(Path(__file__).resolve().parent.parent / "configs" / "bench_step.yaml")
    return path, [f"model.path={tiny_model_dir}", "learner.micro_batch_tokens=128"]


def test_bench_step_profile_learner(bench_config, tmp_path):
    from transformers import AutoConfig

    from rl.bench import step
    from rl.config import load_config

    path, overrides = bench_config
    config = load_config(path, overrides)
    vocab = AutoConfig.from_pretrained(config.model.path).vocab_size
    result = step.profile_learner(config, _fake_rollout(vocab), 12, tmp_path)
    trace = json.loads((tmp_path / "learner_trace.json").read_text())
    assert trace["traceEvents"]
    text = (tmp_path / "learner_profile.txt").read_text()
    assert "lm_head_logprobs" in text and "aten::" in text  # the category table and the top ops
    for cat in ("gemm", "lm_head_logprobs", "attention", "optimizer"):
        assert result["cpu_s"][cat] > 0, cat
    assert result["sequences"] == 12 and result["peak_tflops"] == 0.5
    assert result["learner_mfu"] == pytest.approx(result["learner_tflops"] / 0.5)


def test_bench_step_layout_comparison_reports_mfu(bench_config, monkeypatch):
    from transformers import AutoConfig

    from rl.bench import step
    from rl.config import load_config

    path, overrides = bench_config
    vocab = AutoConfig.from_pretrained(load_config(path, overrides).model.path).vocab_size
    monkeypatch.setattr(step, "VARIANTS", (("bfloat16", [("shared_prompt", 0, "eager"), ("padded", 0, "sdpa")]),))
    rows = step.layout_comparison(path, overrides, _fake_rollout(vocab), 12, 1)
    assert len(rows) == 2
    for r in rows:
        assert r["learner_tflops"] > 0 and r["learner_mfu"] == pytest.approx(r["learner_tflops"] / 0.5)


def test_bench_step_perf_split_estimate_and_logged(tiny_model_dir):
    from transformers import AutoConfig

    from rl.bench.step import perf_split

    hf = AutoConfig.from_pretrained(tiny_model_dir)
    # 2 sequences per step, prompt 10 and response 20 tokens each: trained 60, generated 40
    split = {"response_length_mean": 20.0, "completion_tokens": 40.0, "trained_tokens": 60.0,
             "train_s": 2.0, "generate_s": 4.0}
    out = perf_split([{}, {}], split, hf, learner_peak=1.0, rollout_peak=2.0)
    learner = 2 * perf.learner_flops(hf, [10], [20])
    rollout = 2 * perf.rollout_flops(hf, [10], [20])
    assert out["perf/learner_tflops"] == pytest.approx(learner / 2.0 / 1e12)
    assert out["perf/learner_mfu"] == pytest.approx(learner / 2.0 / 1e12 / 1.0)
    assert out["perf/rollout_tokens_per_s"] == 10.0
    assert out["perf/rollout_mfu"] == pytest.approx(rollout / 4.0 / 1e12 / 2.0)
    assert out["perf/source"] == "estimated from mean lengths"
    logged = [{"perf/learner_tflops": 9.0, "perf/learner_mfu": 0.9, "perf/rollout_tokens_per_s": 1.0,
               "perf/rollout_mfu": 0.1}] * 3
    out = perf_split(logged, split, hf, 1.0, 2.0)
    assert out["perf/learner_tflops"] == 9.0 and out["perf/source"] == "trainer metrics"
