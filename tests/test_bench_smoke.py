"""Benchmarks `python -m rl.bench ...`: the CLI, pieces in-process, `rewards` at toy size, then
`step`, `sync`, `trl` at toy size.

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


def test_memcpy_bandwidth_is_bytes_over_the_best_copy_time(monkeypatch):
    from rl.bench import sync

    # A clock that advances 0.5 s per reading: every timed copy takes exactly 0.5 s, so the
    # bandwidth must be the byte count / 0.5 s in GB/s (1e9 bytes), whatever the machine; and
    # every copy (one untimed, then one per repeat) must move exactly that many bytes.
    clock = iter(range(10**6))
    monkeypatch.setattr(sync.time, "perf_counter", lambda: next(clock) * 0.5)
    copied = []
    real_copy = torch.Tensor.copy_

    def counting_copy(dst, src, *a, **kw):
        copied.append((dst.numel() * dst.element_size(), src.numel() * src.element_size()))
        return real_copy(dst, src, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "copy_", counting_copy)
    nbytes = 3 << 20
    assert sync.memcpy_gbps(nbytes, repeats=3) == nbytes / 0.5 / 1e9
    assert copied == [(nbytes, nbytes)] * 4


def test_memcpy_bandwidth_agrees_with_an_independent_timing():
    import time

    import numpy as np

    from rl.bench.sync import memcpy_gbps

    nbytes = 32 << 20
    src, dst = np.ones(nbytes, np.uint8), np.empty(nbytes, np.uint8)
    np.copyto(dst, src)  # fault in the pages
    ours, independent = [], []
    for _ in range(3):  # interleaved, so load from other jobs hits both alike
        ours.append(memcpy_gbps(nbytes, repeats=3))
        for _ in range(3):
            t0 = time.perf_counter()
            np.copyto(dst, src)
            independent.append(nbytes / (time.perf_counter() - t0) / 1e9)
    ratio = max(ours) / max(independent)
    # Same bytes, same kind of copy: within a factor that machine noise stays inside, but that a
    # wrong byte count or unit (x4 elements, MiB vs bytes, 1e6 vs 1e9) would leave.
    assert 1 / 4 < ratio < 4, (ours, independent)


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


EXPECTED_SUBCOMMANDS = {"rollout", "step", "sync", "trl", "objectives", "rewards", "async"}


def test_subcommands_are_registered_and_each_help_runs(capsys):
    assert set(bench.SUBCOMMANDS) == EXPECTED_SUBCOMMANDS
    for name in sorted(EXPECTED_SUBCOMMANDS):
        module = importlib.import_module(f"rl.bench.{bench.MODULES.get(name, name)}")
        assert callable(module.add_arguments) and callable(module.run), name
        with pytest.raises(SystemExit) as e:
            bench.main([name, "--help"])
        assert e.value.code == 0, name
        assert capsys.readouterr().out.startswith(f"usage: python -m rl.bench {name} "), name
    with pytest.raises(SystemExit) as e:
        bench.main(["no_such_bench"])
    assert e.value.code == 2
    assert "invalid choice: 'no_such_bench'" in capsys.readouterr().err


def test_rewards_bench_scores_every_sample_and_writes_json(tmp_path, capsys):
    assert bench.main(["rewards", "--samples", "24", "--workers", "1", "--repeats", "2",
                       "--completion-chars", "10", "--out-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "rewards.json").read_text())["rows"]
    assert [r["function"] for r in rows] == ["plain (per-sample)", "trl (batch)"]
    for r in rows:
        assert r["samples"] == 24 and r["repeats"] == 2
        assert 0 < r["best_ms_per_sample"] <= r["median_ms_per_sample"] and r["startup_s"] > 0
    assert capsys.readouterr().out.count("ms/sample (median of 2;") == 2


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
