"""End to end on a tiny model: Ray + vLLM rollout actor + learner actor + verified sync + checkpoint + resume.

`python -m rl.train` as a user runs it (a subprocess), so start-up, Ray and the CLI are covered.
"""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

# The tiny random model never answers arithmetic, so the reward must vary for GRPO to have
# a gradient: distinct characters in the completion (a plain per-sample function in a file).
REWARD_FILE = '''
def variety(prompt, completion, answer=None, **kwargs):
    return len(set(completion)) / 10.0
'''


def _train(tmp_path, model_dir, *overrides):
    args = [sys.executable, "-m", "rl.train", "configs/quickstart.yaml",
            f"model.path={model_dir}", "model.dtype=float32",
            "data.prompts_per_step=3", "data.max_prompt_tokens=64",
            "rollout.group_size=4", "rollout.max_new_tokens=12", "rollout.gpu_memory_utilization=0.05",
            f"reward.functions=[{{path: '{tmp_path / 'reward.py'}:variety'}}]", "reward.workers=1",
            "learner.lr=1e-3", "learner.micro_batch_tokens=512",
            f"trainer.output_dir={tmp_path / 'run'}", "trainer.checkpoint_every=1", *overrides]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=_repo_root())
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _repo_root():
    from pathlib import Path

    return str(Path(__file__).resolve().parent.parent)


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    tmp_path = tmp_path_factory.mktemp("e2e")
    (tmp_path / "reward.py").write_text(REWARD_FILE)
    proc = _train(tmp_path, tiny_model_dir, "trainer.total_steps=2")
    return tmp_path, proc


def test_two_steps_write_metrics_plots_config(trained):
    tmp_path, proc = trained
    run = tmp_path / "run"
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2]
    required = ["reward/mean", "reward/std", "response_length/mean", "response_length/max", "loss",
                "clip_ratio", "entropy", "grad_norm", "tokens/generated", "time/generate", "time/reward",
                "time/train", "time/sync", "time/step", "sync/max_logprob_diff", "sync/seconds", "sync/bytes"]
    for row in rows:
        missing = [k for k in required if k not in row]
        assert not missing, missing
        assert row["sync/max_logprob_diff"] < 1e-3  # float32: verification passed
        assert row["sync/bytes"] > 100_000
        assert row["tokens/generated"] > 0
    assert rows[0]["reward/std"] > 0 and rows[0]["grad_norm"] > 0  # there was something to learn
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert "objective" in (run / "config.yaml").read_text()
    assert "step 2: reward" in proc.stderr + proc.stdout  # one-line summary per step
    # quickstart.yaml evaluates on held-out prompts: before step 1 (in step 1's row) and at the end
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2]
    for row in rows:
        assert 0 <= row["eval/pass@1"] <= row["eval/pass@4"] <= 1 and "eval/reward_mean" in row
    assert rows[0]["eval/reward_mean"] == evals[0]["eval/reward_mean"]
    where = json.loads((run / "placement.json").read_text())
    assert [a["rank"] for a in where["rollout"]] == [0] and [a["rank"] for a in where["learner"]] == [0]
    assert all(len(a["node_id"]) > 20 and a["node_ip"] for a in where["rollout"] + where["learner"])
    assert all(k in rows[-1] for k in ("perf/learner_tflops", "perf/learner_mfu", "perf/rollout_tokens_per_s",
                                       "perf/rollout_mfu", "staleness/max", "behavior/ess_fraction"))


def test_checkpoint_is_hugging_face_and_weights_changed(trained, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = trained[0] / "run" / "checkpoints" / "step_2"
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    AutoTokenizer.from_pretrained(ckpt)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [n for (n, p), (_, q) in zip(model.named_parameters(), base.named_parameters())
               if not torch.equal(p, q)]
    assert len(changed) > len(list(base.parameters())) // 2


def test_checkpoint_loads_in_vllm(trained):
    from rollout.worker import RolloutWorker
    from rollout.records import SampleRequest

    ckpt = trained[0] / "run" / "checkpoints" / "step_2"
    worker = RolloutWorker(str(ckpt), dtype="float32", max_model_len=128, gpu_memory_utilization=0.05)
    out = worker.generate([SampleRequest(0, worker.tokenizer("What is 1 + 1?")["input_ids"])], 2, 4)
    assert len(out.samples) == 2 and all(s.response_ids for s in out.samples)


def test_resume_continues_step_data_and_optimizer(trained, tiny_model_dir):
    tmp_path, _ = trained
    run = tmp_path / "run"
    state2 = json.loads((run / "checkpoints" / "step_2" / "trainer_state.json").read_text())
    _train(tmp_path, tiny_model_dir, "trainer.total_steps=3",
           f"trainer.resume_from={run / 'checkpoints' / 'step_2'}")
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3]  # step count continues, no duplicate rows
    assert rows[2]["sync/max_logprob_diff"] < 1e-3  # the resumed weights reached vLLM
    state3 = json.loads((run / "checkpoints" / "step_3" / "trainer_state.json").read_text())
    assert state3["data"]["offset"] == state2["data"]["offset"] + 3  # the next 3 prompts, not the first
    import torch
    opt = torch.load(run / "checkpoints" / "step_3" / "optimizer.pt", weights_only=False)
    steps = {int(s["step"]) for s in opt["optimizer"]["state"].values()}
    assert steps == {3}  # AdamW moments continued from step 2's state


def test_broadcast_sync_to_two_engines_from_two_learners(tmp_path, tiny_model_dir):
    """rollout.weight_sync=broadcast (the GPU path, gloo here): learner rank 0 of two data-parallel
    learners broadcasts ~52 KB buckets to two rollout engines; every step's canary check passes
    on both engines (float32: 1e-3), so both received every bucket in the right place."""
    (tmp_path / "reward.py").write_text(REWARD_FILE)
    _train(tmp_path, tiny_model_dir, "trainer.total_steps=2", "trainer.checkpoint_every=0",
           "rollout.weight_sync=broadcast", "rollout.weight_bucket_mb=0.05",
           "rollout.workers=2", "learner.workers=2", "data.prompts_per_step=4")
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row["grad_norm"] > 0
        assert row["sync/max_logprob_diff"] < 1e-3
        assert row["sync/bytes"] > 100_000


def test_fsdp_learners_train_checkpoint_and_resume(tmp_path, tiny_model_dir):
    """learner.strategy=fsdp with two ranks: each step's weights are gathered from the shards for
    the sync (float32 canary within 1e-3, with the broadcast path), the checkpoint is a plain
    Hugging Face model, and a resumed run continues AdamW from the gathered optimizer state."""
    import torch
    from transformers import AutoModelForCausalLM

    (tmp_path / "reward.py").write_text(REWARD_FILE)
    fsdp = ["learner.workers=2", "learner.strategy=fsdp", "rollout.weight_sync=broadcast",
            "data.prompts_per_step=4"]
    _train(tmp_path, tiny_model_dir, "trainer.total_steps=2", *fsdp)
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_2"
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [n for (n, p), (_, q) in zip(model.named_parameters(), base.named_parameters()) if not torch.equal(p, q)]
    assert len(changed) > len(list(base.parameters())) // 2
    opt = torch.load(ckpt / "optimizer.pt", weights_only=False)
    assert {int(s["step"]) for s in opt["optimizer_by_name"]["state"].values()} == {2}

    _train(tmp_path, tiny_model_dir, "trainer.total_steps=3", f"trainer.resume_from={ckpt}", *fsdp)
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert row["grad_norm"] > 0 and row["sync/max_logprob_diff"] < 1e-3
    opt = torch.load(run / "checkpoints" / "step_3" / "optimizer.pt", weights_only=False)
    assert {int(s["step"]) for s in opt["optimizer_by_name"]["state"].values()} == {3}


@pytest.mark.parametrize("weight_sync", ["object_store", "broadcast"])
def test_sync_check_catches_stale_weights(tmp_path, tiny_model_dir, weight_sync):
    """The check that guards every step: learner weights that the engines do not have (changed
    after the sync) raise SyncError; syncing brings them back within float32 tolerance."""
    import ray
    import torch

    from rl.config import load_config
    from rl.errors import SyncError
    from rl.train import init_ray, preflight
    from rl.trainer import Trainer

    (tmp_path / "reward.py").write_text(REWARD_FILE)
    config = load_config(f"{_repo_root()}/configs/quickstart.yaml", [
        f"model.path={tiny_model_dir}", "model.dtype=float32", "rollout.gpu_memory_utilization=0.05",
        f"rollout.weight_sync={weight_sync}", "data.max_prompt_tokens=64", "rollout.max_new_tokens=8",
        f"reward.functions=[{{path: '{tmp_path / 'reward.py'}:variety'}}]", "reward.workers=1",
        f"trainer.output_dir={tmp_path / 'run'}"])
    init_ray(config)
    trainer = Trainer(preflight(config))
    try:
        first = trainer.sync_weights(version=1)
        assert first["sync/max_logprob_diff"] < 1e-3
        ray.get(trainer.learners.rank0.__ray_call__.remote(lambda self: [
            p.data.add_(torch.randn_like(p) * 0.05) for p in self.updater.params] and None))
        trainer.submit_check(version=1)
        with pytest.raises(SyncError, match="not running the learner's weights"):
            trainer.verify_pending_syncs(up_to=1)
        again = trainer.sync_weights(version=2)
        assert again["sync/max_logprob_diff"] < 1e-3 and again["sync/checked_version"] == 2
    finally:
        trainer.close()
        ray.shutdown()
