"""Bucketed weight broadcast (rollout/weight_broadcast.py): the bucket plan, and real transfers
between two processes over gloo, the backend the GPU path swaps for nccl."""

import math
import multiprocessing as mp
import socket

import pytest
import torch

from rollout.weight_broadcast import ALIGN_BYTES, TensorMeta, WeightBroadcaster, describe, open_group, plan_buckets, receive


def _metas(*sizes, dtype="bfloat16"):
    return [TensorMeta(f"t{i}", dtype, (n,)) for i, n in enumerate(sizes)]


def test_plan_worked_example():
    # bf16: 2 bytes per element. t0 = 100 B, t1 = 30 B (starts at 112: 16-byte alignment),
    # t2 = 60 B would end at 144 + 60 = 204 > 200: new bucket; t3 = 500 B alone (oversized).
    buckets = plan_buckets(_metas(50, 15, 30, 250, 10), bucket_bytes=200)
    assert [[s.meta.name for s in b.slots] for b in buckets] == [["t0", "t1"], ["t2"], ["t3"], ["t4"]]
    assert [s.offset for s in buckets[0].slots] == [0, 112]
    assert [b.nbytes for b in buckets] == [142, 60, 500, 20]


@pytest.mark.parametrize("seed", range(5))
def test_plan_properties(seed):
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 400, (60,), generator=gen).tolist()
    metas = _metas(*sizes, dtype=["float32", "bfloat16"][seed % 2])
    bucket_bytes = 512
    buckets = plan_buckets(metas, bucket_bytes)
    # every tensor once, in order
    assert [s.meta for b in buckets for s in b.slots] == metas
    for b in buckets:
        ends = [s.offset + s.meta.nbytes for s in b.slots]
        assert all(s.offset % ALIGN_BYTES == 0 for s in b.slots)
        assert all(e <= nxt.offset for e, nxt in zip(ends, b.slots[1:]))  # no overlap
        assert b.nbytes == ends[-1]
        assert b.nbytes <= bucket_bytes or len(b.slots) == 1  # only a lone oversized tensor exceeds
    # greedy: the next bucket's first tensor did not fit in the previous bucket
    for prev, nxt in zip(buckets, buckets[1:]):
        first = nxt.slots[0].meta.nbytes
        assert math.ceil(prev.nbytes / ALIGN_BYTES) * ALIGN_BYTES + first > bucket_bytes


def test_plan_rejects_a_zero_bucket():
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets(_metas(4), 0)


def _weights(seed=0):
    """fp32 'master weights' of mixed shapes, one larger than the buckets used below."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(64, 32), (32,), (300, 40), (7, 3), (5,), (128, 16), (1,), (33, 17)]
    return {f"layer.{i}.w": torch.randn(s, generator=gen) for i, s in enumerate(shapes)}


def _receiver(port, bucket_bytes, queue):
    torch.set_num_threads(1)
    group = open_group("127.0.0.1", port, 1, 2, "gloo", timeout_s=60)
    metas = describe(_weights(), torch.bfloat16)
    loaded = []  # kept across buckets: views must not be overwritten by later buckets
    for _ in range(2):  # two syncs on one group
        loaded.clear()
        nbytes = receive(group, metas, bucket_bytes, torch.device("cpu"), loaded.extend)
    queue.put((nbytes, [(name, t.clone()) for name, t in loaded]))


@pytest.mark.slow  # spawns a second Python process (torch import, gloo group): seconds
def test_broadcast_delivers_every_tensor_cast_and_intact():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bucket_bytes = 8 << 10  # 8 KiB: the (300, 40) tensor (24 KB in bf16) gets its own bucket
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_receiver, args=(port, bucket_bytes, queue))
    proc.start()
    try:
        group = open_group("127.0.0.1", port, 0, 2, "gloo", timeout_s=60)
        sender = WeightBroadcaster(group, torch.device("cpu"), bucket_bytes)
        weights = _weights()
        first = sender.send({k: v * 0 for k, v in weights.items()}, torch.bfloat16)
        second = sender.send(weights, torch.bfloat16)
        nbytes, loaded = queue.get(timeout=120)
    finally:
        proc.join(timeout=60)
    assert proc.exitcode == 0
    # 8 KiB buckets: [4096 B + 64 B], [24,000 B alone], [the six small ones]
    assert first["buckets"] == 3 and second["bytes"] == nbytes
    assert [name for name, _ in loaded] == list(weights)
    for name, got in loaded:
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, weights[name].to(torch.bfloat16)), name  # the second sync, bit for bit


@pytest.mark.parametrize("gpus, overrides, expected", [
    (0, [], "object_store"),                                         # CPU
    (1, [], "object_store"),                                         # 1 GPU shared by rollout + learner
    (2, [], "broadcast"),                                            # one GPU each
    (8, ["rollout.workers=4", "learner.workers=4"], "broadcast"),    # configs/gpu/qwen3_1.7b_multi.yaml
    (4, ["rollout.workers=4", "learner.workers=4"], "object_store"),  # shared GPUs
    (0, ["rollout.weight_sync=broadcast"], "broadcast"),             # explicit wins (gloo on CPU)
    (8, ["rollout.weight_sync=object_store"], "object_store"),
])
def test_auto_weight_sync_needs_a_gpu_per_actor(monkeypatch, gpus, overrides, expected):
    import rl.actors
    from rl.config import load_config

    monkeypatch.setattr(rl.actors.ray, "cluster_resources", lambda: {"GPU": gpus} if gpus else {})
    assert rl.actors.weight_sync_method(load_config(None, overrides)) == expected


@pytest.mark.slow
def test_a_failing_member_raises_at_once_not_after_the_blocked_ones():
    """When one member of the broadcast fails, the others stay blocked in the collective until
    its timeout; the sync reports the failure without waiting for them."""
    import time

    import ray

    from rl.errors import SyncError
    from rl.weight_sync import _get_failing_fast

    @ray.remote
    def blocked_in_collective():
        time.sleep(300)

    @ray.remote
    def engine_that_failed():
        raise RuntimeError("engine 1: out of memory while loading bucket 3")

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        start = time.perf_counter()
        with pytest.raises(SyncError, match="bucket 3"):
            _get_failing_fast([blocked_in_collective.remote(), engine_that_failed.remote()])
        assert time.perf_counter() - start < 60
    finally:
        ray.shutdown()
