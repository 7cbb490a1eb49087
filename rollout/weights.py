"""Weight transport learner -> rollout worker, and the functions that run inside the vLLM worker.

CPU path (this file): the learner casts its weights into ONE contiguous byte buffer per dtype
(`FlatWeights`, numpy), which Ray serializes out-of-band: `ray.put`/a task return writes the
buffer into the node's shared-memory object store with one memcpy and no pickling of tensor
data, and `ray.get` on the same node hands back a read-only numpy array that maps that same
memory (zero-copy). The receiver takes views of it (`unflatten_weights`), so the only copies
left are the cast (fp32 master -> bf16), the store write, and vLLM's own load into its
parameters. A dict of torch tensors, by contrast, goes through pickle and is rebuilt
tensor by tensor.

GPU path: rollout/weight_broadcast.py (a bucketed NCCL broadcast from learner rank 0 through
vLLM's weight-transfer API; the bytes never leave GPU memory).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# torch dtype name (as in str(dtype) without "torch.") <-> dtype; numpy has no bfloat16, so the
# buffers are raw bytes and the dtype travels as a name.
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.bfloat16, torch.float16, torch.float32,
                                                       torch.float64, torch.int64, torch.int32,
                                                       torch.int8, torch.uint8, torch.bool)}


@dataclass
class FlatEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    """Element offset in the buffer of `dtype`."""

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


@dataclass
class FlatWeights:
    """Named tensors as one byte buffer per dtype: buffers[dtype] uint8 [nbytes]."""

    buffers: dict[str, np.ndarray]
    entries: list[FlatEntry]

    @property
    def nbytes(self) -> int:
        return int(sum(b.nbytes for b in self.buffers.values()))

    def __len__(self) -> int:
        return len(self.entries)


def flat_layout(named: dict[str, torch.Tensor], dtype: torch.dtype | None = None
                ) -> tuple[list[FlatEntry], dict[str, int]]:
    """Where every tensor goes (cast to `dtype` when given); bytes per dtype buffer."""
    entries: list[FlatEntry] = []
    numel: dict[str, int] = {}
    for name, t in named.items():
        d = str(dtype or t.dtype).removeprefix("torch.")
        entries.append(FlatEntry(name, d, tuple(t.shape), numel.get(d, 0)))
        numel[d] = numel.get(d, 0) + t.numel()
    return entries, {d: n * _DTYPES[d].itemsize for d, n in numel.items()}


class FlatPacker:
    """Reusable flat buffers on the sending side: `pack(named)` writes into them, in place.

    Each tensor is cast straight into its slot (`copy_` casts while it copies), so fp32
    master weights become bf16 bytes in one pass, without a temporary bf16 copy per tensor.
    The returned FlatWeights shares these buffers: serialize it (ray.put / return it from an
    actor method) before the next `pack`.
    """

    def __init__(self, dtype: torch.dtype | None = None):
        self.dtype = dtype
        self._key: tuple | None = None
        self._bytes: dict[str, torch.Tensor] = {}

    def pack(self, named: dict[str, torch.Tensor]) -> FlatWeights:
        entries, sizes = flat_layout(named, self.dtype)
        key = tuple((e.name, e.dtype, e.shape) for e in entries)
        if key != self._key:  # first call, or the set of tensors changed: (re)allocate
            self._bytes = {d: torch.empty(n, dtype=torch.uint8) for d, n in sizes.items()}
            self._key = key
        typed = {d: b.view(_DTYPES[d]) for d, b in self._bytes.items()}
        with torch.no_grad():
            for e, t in zip(entries, named.values()):
                typed[e.dtype][e.offset:e.offset + e.numel].view(e.shape).copy_(t.detach())
        return FlatWeights({d: b.numpy() for d, b in self._bytes.items()}, entries)


def flatten_weights(named: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> FlatWeights:
    """One-shot `FlatPacker(dtype).pack(named)` (fresh buffers)."""
    return FlatPacker(dtype).pack(named)


def unflatten_weights(flat: FlatWeights) -> dict[str, torch.Tensor]:
    """Views into the flat buffers (no copy), under the original names and shapes.

    Buffers that come from Ray's object store are read-only; the views are only read from
    (vLLM copies them into its parameters), so torch's not-writable warning is silenced.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        typed = {d: torch.from_numpy(b).view(_DTYPES[d]) for d, b in flat.buffers.items()}
    return {e.name: typed[e.dtype][e.offset:e.offset + e.numel].view(e.shape) for e in flat.entries}


def as_named_tensors(weights: FlatWeights | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return unflatten_weights(weights) if isinstance(weights, FlatWeights) else weights


def load_weights_into_worker(worker: Any, named_tensors: dict) -> int:
    """Reload the model's weights in place from HF-named tensors; returns the tensor count.

    Tied embeddings: the CPU backend packs `lm_head` into a kernel-specific copy when the
    model loads. `reload_weights` re-processes only the layers whose weights it loaded, and a
    tied `lm_head` loads nothing of its own (it shares `embed_tokens.weight`), so its packed
    copy keeps the old embedding: log-probs were off by ~1.1 after one update of SmolLM2.
    Re-running the lm_head's post-load processing repacks it from the shared weight.
    """
    worker.reload_weights(weights_iterator=iter(named_tensors.items()))
    repack_tied_lm_head(worker)
    return len(named_tensors)


def repack_tied_lm_head(worker: Any) -> None:
    """Rebuild a tied lm_head's kernel copy from the embedding (see load_weights_into_worker);
    needed after any in-place reload, whichever transport brought the weights."""
    model = worker.model_runner.get_model()
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        lm_head = getattr(model, "lm_head", None)
        method = getattr(lm_head, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(lm_head)


def lm_head_staleness(worker: Any) -> float:
    """Max |lm_head(x) - x @ W^T| on a random probe: > 0 beyond rounding means a stale packed copy."""
    model = worker.model_runner.get_model()
    lm_head = model.lm_head
    weight = lm_head.weight
    if weight.numel() == 0:  # packed-only layer: nothing to compare with
        return 0.0
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(4, weight.shape[1], generator=gen).to(weight.dtype)
    packed = lm_head.quant_method.apply(lm_head, probe).float()
    reference = probe.float() @ weight.float().T
    return float((packed - reference).abs().max())
