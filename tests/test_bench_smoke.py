"""Benchmarks `python -m rl.bench {step,sync,trl}`: pieces in-process, then each at toy size.

The `slow` tests start Ray and vLLM on a tiny random model (minutes); the TRL one skips when
trl (the optional `bench` extra) is not installed.
"""

import importlib.util
import json

import pytest
import torch

from rl.bench import __main__ as bench
from rollout.weights import FlatPacker, flatten_weights, unflatten_weights

HAS_TRL = importlib.util.find_spec("trl") is not None


# --- sync transport: flat buffers ------------------------------------------------------------

def _named():
    gen = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(3, 4, generator=gen), "b.bias": torch.randn(5, generator=gen),
            "c.scale": torch.randn((), generator=gen), "d.ids": torch.arange(6, dtype=torch.int64).view(2, 3)}


def test_flat_round_trip_keeps_names_shapes_values():
    named = _named()
    flat = flatten_weights(named)
    assert set(flat.buffers) == {"float32", "int64"}  # one buffer per dtype
    assert flat.nbytes == sum(t.numel() * t.element_size() for t in named.values())
    back = unflatten_weights(flat)
    assert list(back) == list(named)
    for k in named:
        assert back[k].dtype == named[k].dtype and torch.equal(back[k], named[k])


def test_flat_cast_and_views_share_the_buffer():
    named = {k: v for k, v in _named().items() if v.is_floating_point()}
    flat = flatten_weights(named, torch.bfloat16)
    back = unflatten_weights(flat)
    for k, v in named.items():
        assert back[k].dtype == torch.bfloat16 and torch.equal(back[k], v.to(torch.bfloat16))
    # Views, not copies: writing the buffer shows through every tensor.
    flat.buffers["bfloat16"][:] = 0
    assert all(float(t.abs().sum()) == 0.0 for t in back.values())


def test_flat_survives_pickle_out_of_band():
    # Ray serializes with pickle protocol 5; the buffers travel as out-of-band PickleBuffers.
    import pickle

    named = _named()
    flat = flatten_weights(named)
    buffers = []
    data = pickle.dumps(flat, protocol=5, buffer_callback=buffers.append)
    assert len(buffers) == len(flat.buffers) and len(data) < 2000  # metadata only in-band
    back = unflatten_weights(pickle.loads(data, buffers=buffers))
    assert all(torch.equal(back[k], named[k]) for k in named)


def test_packer_reuses_buffers_and_sees_new_values():
    named = {k: v for k, v in _named().items() if v.is_floating_point()}
    packer = FlatPacker(torch.bfloat16)
    first = packer.pack(named)
    address = first.buffers["bfloat16"].ctypes.data
    named = {k: v + 1 for k, v in named.items()}
    second = packer.pack(named)
    assert second.buffers["bfloat16"].ctypes.data == address
    assert all(torch.equal(unflatten_weights(second)[k], v.to(torch.bfloat16)) for k, v in named.items())


def test_memcpy_bandwidth_is_positive():
    from rl.bench.sync import memcpy_gbps

    assert memcpy_gbps(1 << 20, repeats=2) > 0


# --- step bench: phase split from metrics rows -----------------------------------------------

def test_phase_split_skips_warmup_and_accounts_idle():
    from rl.bench.step import phase_split

    row = lambda g: {"time/generate": g, "time/reward": 1.0, "time/train": 2.0, "time/sync": 0.5,  # noqa: E731
                     "time/step": g + 4.0, "tokens/generated": 100.0, "train/tokens": 300.0,
                     "train/padding_fraction": 0.0}
    split = phase_split([row(100.0), row(10.0), row(10.0)])  # step 1 (warm-up) left out
    assert split["steps_measured"] == 2 and split["generate_s"] == 10.0
    assert split["idle_s"] == pytest.approx(0.5)  # 14 - (10 + 1 + 2 + 0.5)
    assert split["generated_tok_per_s"] == pytest.approx(10.0)
    assert split["trained_tok_per_s"] == pytest.approx(150.0)


def test_subcommands_are_registered():
    for name in ("step", "sync", "trl"):
        assert importlib.util.find_spec(f"rl.bench.{name}") is not None
    with pytest.raises(SystemExit) as e:
        bench.main(["trl", "--help"])
    assert e.value.code == 0


# --- each subcommand at toy size (Ray + vLLM) ------------------------------------------------

def _toy_overrides(model_dir: str) -> list[str]:
    return [f"model.path={model_dir}", "model.dtype=float32", "data.prompts_per_step=2",
            "rollout.group_size=2", "rollout.max_new_tokens=8", "rollout.gpu_memory_utilization=0.05",
            "data.max_prompt_tokens=64", "reward.workers=1", "learner.micro_batch_tokens=512"]


@pytest.mark.slow
def test_sync_bench_toy(tmp_path):
    out = tmp_path / "sync"
    assert bench.main(["sync", "--sizes", "64x2", "--no-demo", "--repeats", "1", "--memcpy-mb", "16", "--gpu-memory-utilization", "0.05",
                       "--out-dir", str(out)]) == 0
    result = json.loads((out / "sync.json").read_text())
    assert result["memcpy_gbps"] > 0 and (out / "sync.png").exists()
    transports = {r["transport"] for r in result["summary"]}
    assert transports == {"flat", "broadcast", "legacy"}
    for row in result["summary"]:
        assert row["GB/s"] > 0 and row["canary_diff_after"] <= 0.5
        assert row["canary_diff_before"] > row["canary_diff_after"]  # the check sees perturbed weights


@pytest.mark.slow
def test_step_bench_toy(tmp_path, tiny_model_dir):
    out = tmp_path / "step"
    assert bench.main(["step", "--steps", "2", "--out-dir", str(out), "--layout-sequences", "4",
                       "--layout-repeats", "1", *_toy_overrides(tiny_model_dir)]) == 0
    result = json.loads((out / "step.json").read_text())
    assert result["split"]["step_s"] > 0 and (out / "step.png").exists()
    kinds = {(r["layout"], r["attention"], r["dtype"]) for r in result["layouts"]}
    assert kinds == {("shared_prompt", "eager", "bfloat16"), ("shared_prompt", "sdpa", "bfloat16"),
                     ("padded", "eager", "bfloat16"), ("padded", "sdpa", "bfloat16"),
                     ("packed/256", "eager", "bfloat16"), ("shared_prompt", "eager", "float32"),
                     ("padded", "eager", "float32")}
    assert all(r["padding_fraction"] == 0 for r in result["layouts"] if r["layout"].startswith("packed"))
    # 4 sequences = 2 groups of 2 sharing their prompts: the prompt pass runs once per group
    by = {(r["layout"], r["attention"], r["dtype"]): r for r in result["layouts"]}
    assert (by[("shared_prompt", "eager", "float32")]["processed_tokens"]
            < by[("padded", "eager", "float32")]["processed_tokens"])


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRL, reason="trl not installed (optional extra `bench`: pip install --no-deps trl)")
def test_trl_bench_toy(tmp_path, tiny_model_dir):
    out = tmp_path / "trl"
    assert bench.main(["trl", "--steps", "2", "--trl-steps", "2", "--out-dir", str(out),
                       *_toy_overrides(tiny_model_dir)]) == 0
    result = json.loads((out / "trl.json").read_text())
    assert result["ratio"] > 0 and result["trl"]["steps"] == 2 and (out / "trl.png").exists()


def test_bench_and_gpu_configs_validate():
    # tests/test_config.py loads configs/*.yaml; the GPU recipes live one folder down.
    from pathlib import Path

    from rl.config import load_config

    root = Path(__file__).parent.parent / "configs"
    paths = sorted(root.glob("gpu/*.yaml")) + sorted(root.glob("bench_step*.yaml"))
    assert any("gpu" in str(p) for p in paths)
    for path in paths:
        config = load_config(path)
        assert config.model.dtype == "bfloat16"
