"""Collective weight broadcast, learner rank 0 -> every rollout engine: the GPU sync path.

One process group holds the sender (learner rank 0, group rank 0) and the rollout engines
(group ranks 1..W). Every sync the sender casts its weights, bucket by bucket, into a byte
buffer and broadcasts it; each engine receives every bucket into a fresh buffer and hands
views of it to the model's `load_weights` inside vLLM's weight-transfer API
(`start_weight_update` -> `update_weights` -> `finish_weight_update`: vLLM's layerwise reload,
which post-processes each layer as soon as all of its weights have arrived).

The backend is nccl when the tensors live on a GPU, so the bytes go GPU -> GPU (NVLink, PCIe
or InfiniBand) and never through host memory, and gloo on CPU. The code is the same; only the
backend name and the buffers' device differ, which is how the tests here exercise the GPU path
on CPU machines. On one CPU node the object-store path (rollout/weights.py) is faster (gloo
copies through TCP loopback; the figures: docs/BENCHMARKS.md, weight sync) and stays the CPU
default.

Both sides derive the same bucket plan from the same metadata (`plan_buckets`), so only names,
dtypes and shapes travel with the request; the bytes travel in the broadcasts.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterable

import torch

ENGINE_BACKEND = "rl_broadcast"
"""Name under which `BroadcastWeightTransferEngine` is registered with vLLM's factory."""

ALIGN_BYTES = 16  # every tensor starts 16-byte aligned in a bucket, so typed views are aligned


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: str
    """torch dtype name without "torch.", e.g. "bfloat16"."""
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * getattr(torch, self.dtype).itemsize


@dataclass(frozen=True)
class Slot:
    meta: TensorMeta
    offset: int
    """Byte offset of the tensor in its bucket."""


@dataclass
class Bucket:
    slots: list[Slot] = field(default_factory=list)
    nbytes: int = 0

    def add(self, meta: TensorMeta) -> None:
        offset = -(-self.nbytes // ALIGN_BYTES) * ALIGN_BYTES
        self.slots.append(Slot(meta, offset))
        self.nbytes = offset + meta.nbytes

    def views(self, buffer: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) views of a uint8 `buffer` [>= nbytes] holding this bucket."""
        return [(s.meta.name,
                 buffer[s.offset:s.offset + s.meta.nbytes].view(getattr(torch, s.meta.dtype)).view(s.meta.shape))
                for s in self.slots]


def plan_buckets(metas: Iterable[TensorMeta], bucket_bytes: int) -> list[Bucket]:
    """Consecutive tensors in buckets of at most `bucket_bytes` (alignment included).

    Order is kept (vLLM's layerwise reload finishes a layer as soon as its last weight arrives,
    so a layer's weights stay close together). A tensor larger than `bucket_bytes` gets a bucket
    of its own.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes = {bucket_bytes} must be > 0")
    buckets: list[Bucket] = []
    current = Bucket()
    for meta in metas:
        aligned = -(-current.nbytes // ALIGN_BYTES) * ALIGN_BYTES
        if current.slots and aligned + meta.nbytes > bucket_bytes:
            buckets.append(current)
            current = Bucket()
        current.add(meta)
    if current.slots:
        buckets.append(current)
    return buckets


def describe(named: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> list[TensorMeta]:
    """Metadata of `named` as the receivers will see it (cast to `dtype` when given)."""
    return [TensorMeta(name, str(dtype or t.dtype).removeprefix("torch."), tuple(t.shape))
            for name, t in named.items()]


def open_group(master_address: str, master_port: int, rank: int, world_size: int, backend: str,
               timeout_s: float = 600.0):
    """A process group of its own (not torch.distributed's default group, which the learners'
    data-parallel group or vLLM may already own); every member calls this at the same time."""
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group

    return stateless_init_torch_distributed_process_group(
        master_address, master_port, rank, world_size, backend, timeout=timedelta(seconds=timeout_s))


def _broadcast(group, tensor: torch.Tensor):
    """Start broadcasting `tensor` from group rank 0; returns the work handle."""
    from torch.distributed import BroadcastOptions

    opts = BroadcastOptions()
    opts.rootRank = 0
    return group.broadcast([tensor], opts)


class WeightBroadcaster:
    """The sending side (learner rank 0, group rank 0).

    Two reusable buffers: bucket k+1 is cast and copied into one while bucket k is on the wire
    from the other.
    """

    def __init__(self, group, device: torch.device, bucket_bytes: int):
        self.group = group
        self.device = device
        self.bucket_bytes = bucket_bytes
        self._buffers: list[torch.Tensor] = []

    def send(self, named: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, float]:
        """Broadcast `named` (cast to `dtype`) in the order of `describe(named, dtype)`."""
        start = time.perf_counter()
        buckets = plan_buckets(describe(named, dtype), self.bucket_bytes)
        largest = max((b.nbytes for b in buckets), default=0)
        if not self._buffers or self._buffers[0].numel() < largest:
            self._buffers = [torch.empty(largest, dtype=torch.uint8, device=self.device) for _ in range(2)]
        in_flight: list[Any] = [None, None]
        with torch.no_grad():
            for k, bucket in enumerate(buckets):
                slot = k % 2
                if in_flight[slot] is not None:
                    in_flight[slot].wait()  # the buffer is still being sent
                buffer = self._buffers[slot]
                for name, view in bucket.views(buffer):
                    view.copy_(named[name].detach())  # casts while it copies
                in_flight[slot] = _broadcast(self.group, buffer[:bucket.nbytes])
            for work in in_flight:
                if work is not None:
                    work.wait()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # NCCL's wait() only orders streams; time the transfer
        nbytes = sum(b.nbytes for b in buckets)
        return {"seconds": time.perf_counter() - start, "bytes": float(nbytes), "buckets": float(len(buckets))}


def receive(group, metas: list[TensorMeta], bucket_bytes: int, device: torch.device,
            load: Callable[[list[tuple[str, torch.Tensor]]], Any]) -> int:
    """The receiving side: every bucket of `plan_buckets(metas, bucket_bytes)`, in order.

    Bucket k+1 is already arriving while `load` consumes bucket k. Each bucket gets a fresh
    buffer because `load` may keep views of it (vLLM's layerwise reload holds a layer's weights
    until the layer is complete). Returns the bytes received.
    """
    buckets = plan_buckets(metas, bucket_bytes)
    if not buckets:
        return 0

    def post(bucket: Bucket):
        buffer = torch.empty(bucket.nbytes, dtype=torch.uint8, device=device)
        return buffer, _broadcast(group, buffer)

    pending = post(buckets[0])
    for k, bucket in enumerate(buckets):
        buffer, work = pending
        work.wait()
        if k + 1 < len(buckets):
            pending = post(buckets[k + 1])
        load(bucket.views(buffer))
    return sum(b.nbytes for b in buckets)


# --- inside vLLM ---------------------------------------------------------------------------


def register_engine() -> None:
    """Make `weight_transfer_config={"backend": ENGINE_BACKEND}` resolve to our engine.

    Call it in the process that builds the engine's workers, before building them (the rollout
    worker does; its engine core and model run in that process).
    """
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    if ENGINE_BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(ENGINE_BACKEND, __name__, "BroadcastWeightTransferEngine")


@functools.cache
def _engine_class():
    """Defined lazily: the base classes come from vLLM, which the learner need not import."""
    from vllm.distributed.weight_transfer.base import (WeightTransferEngine, WeightTransferInitInfo,
                                                       WeightTransferUpdateInfo)

    @dataclass
    class BroadcastInitInfo(WeightTransferInitInfo):
        master_address: str
        master_port: int
        rank: int
        world_size: int
        backend: str
        bucket_bytes: int
        timeout_s: float = 600.0

    @dataclass
    class BroadcastUpdateInfo(WeightTransferUpdateInfo):
        names: list[str]
        dtype_names: list[str]
        shapes: list[list[int]]

        def metas(self) -> list[TensorMeta]:
            return [TensorMeta(n, d, tuple(s)) for n, d, s in zip(self.names, self.dtype_names, self.shapes)]

    class BroadcastWeightTransferEngine(WeightTransferEngine):
        """vLLM-side receiver: joins the group at init, then loads every broadcast bucket
        through vLLM's layerwise reload (the same reload `reload_weights` runs)."""

        init_info_cls = BroadcastInitInfo
        update_info_cls = BroadcastUpdateInfo

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.group = None
            self.bucket_bytes = 0

        def init_transfer_engine(self, init_info: BroadcastInitInfo) -> None:
            self.bucket_bytes = init_info.bucket_bytes
            self.group = open_group(init_info.master_address, init_info.master_port, init_info.rank,
                                    init_info.world_size, init_info.backend, init_info.timeout_s)

        def start_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

            initialize_layerwise_reload(self.model)

        def receive_weights(self, update_info: BroadcastUpdateInfo) -> None:
            if self.group is None:
                raise RuntimeError("weight broadcast not initialized: call init_weight_transfer_engine first")
            receive(self.group, update_info.metas(), self.bucket_bytes, self.device, self.model.load_weights)

        def finish_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

            finalize_layerwise_reload(self.model, self.model_config)

        def shutdown(self) -> None:
            self.group = None

    return BroadcastWeightTransferEngine


def __getattr__(name: str):
    # vLLM's factory imports the engine class by name from this module.
    if name == "BroadcastWeightTransferEngine":
        return _engine_class()
    raise AttributeError(name)
