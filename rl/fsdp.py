"""Fully sharded data parallel learners (`learner.strategy: fsdp`, torch FSDP2 `fully_shard`).

Each rank keeps 1/world of the fp32 master weights, gradients and AdamW state; a decoder
layer's full weights exist only while that layer runs (all-gathered for its forward and again
for its backward, then freed), and gradients are reduce-scattered to their owners. That is
what lets a model whose fp32 weights + AdamW state (16 bytes per parameter) exceed one GPU
train at all; `replicate` (the default) is faster when they fit.

Every forward and backward is a collective across the ranks, so the ranks must run the same
number of them in the same order: `pad_to_common_count` gives every rank the largest
micro-batch count, the extra ones contributing zero gradient. Anything that reads the full
weights (sync to the rollout engines, canary scoring, checkpoints) runs on every rank, with
rank 0 using the result.

Works with gloo on CPU (the tests) and NCCL on GPU; the code is the same.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: modules whose class the model names in `_no_split_modules`
    (transformers' own list of blocks that must stay whole, e.g. LlamaDecoderLayer)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"learner.strategy = 'fsdp': found no decoder layers in {type(model).__name__} "
                         f"(its _no_split_modules is {sorted(names) or 'empty'}); use learner.strategy: replicate.")
    return layers


def shard_model(model: nn.Module) -> None:
    """fully_shard every decoder layer, then the root (embeddings, final norm, lm_head), over
    the default process group. Tied embeddings stay tied: both names are one parameter of
    the root's group."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    device_type = "cuda" if next(model.parameters()).is_cuda else "cpu"
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in model.modules():
        if isinstance(module, FSDPModule):  # the setters act on one module's group, not its children
            # Losses are normalized by the GLOBAL token count, so the ranks' gradients are
            # summed, not averaged (FSDP's default divides by the world size).
            module.set_gradient_divide_factor(1.0)
            # Plain SUM collectives: gloo has no PREMUL_SUM, which a divide factor would use.
            module.set_force_sum_reduction_for_comms(True)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor from a DTensor shard (a collective: every rank calls it), else `t`."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def pad_to_common_count(count: int, device: torch.device) -> int:
    """The largest of the ranks' micro-batch counts (every rank calls it)."""
    n = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    return int(n.item())


def zero_gradient_pass(model: nn.Module, device: torch.device, pad_id: int) -> None:
    """One forward + backward that adds nothing to any gradient: a rank with fewer
    micro-batches runs these so that its collectives pair up with the other ranks'."""
    ids = torch.full((1, 2), pad_id, dtype=torch.long, device=device)
    logits = model(input_ids=ids).logits
    (logits.float().sum() * 0.0).backward()


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state dicts, on CPU, on rank 0 ({} elsewhere).
    Keyed by parameter name, so a run with another world size can load them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, optim_state: dict) -> None:
    """Inverse of `full_state_dicts` for the optimizer: every rank passes the full state (as
    loaded from the checkpoint) and keeps its own shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True))
