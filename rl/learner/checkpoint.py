"""Checkpoints in Hugging Face format (float32 weights, LoRA merged, tokenizer), plus the
training state a resume needs (optimizer, LR schedule, torch RNG, LoRA adapter).

The driver hands rank 0 a temporary directory (`.step_N.tmp`, rl/checkpoints.py) and renames
it to `step_N` only after every file is written, so this module writes files in any order; it
flushes them to disk before returning, on the node that wrote them."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from rl.checkpoints import OPTIMIZER_FILE, fsync_tree
from rl.learner.model import PolicyModel
from rl.learner.update import PolicyUpdate


def save_checkpoint(policy: PolicyModel, update: PolicyUpdate, path: str, tokenizer_source: str, rank: int) -> None:
    """Every rank calls it (fsdp gathers the shards); rank 0 writes `path`."""
    from transformers import AutoTokenizer

    if policy.fsdp:
        from rl.fsdp import full_state_dicts

        model_state, optim_state = full_state_dicts(policy.net, update.optimizer)
    if rank != 0:
        return
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    training = {"scheduler": update.scheduler.state_dict(), "torch_rng": torch.get_rng_state()}
    if policy.fsdp:
        policy.net.save_pretrained(out, state_dict=model_state, safe_serialization=True)
        # Keyed by parameter name (not index): loads into any number of fsdp ranks.
        training["optimizer_by_name"] = optim_state
    elif policy.lora:
        policy.net.save_pretrained(out / "adapter")
        copy.deepcopy(policy.net).merge_and_unload().save_pretrained(out, safe_serialization=True)
        training["optimizer"] = update.optimizer.state_dict()
    else:
        policy.net.save_pretrained(out, safe_serialization=True)
        training["optimizer"] = update.optimizer.state_dict()
    AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(out)
    torch.save(training, out / OPTIMIZER_FILE)
    fsync_tree(out)  # on disk before the driver renames the directory into place


def load_training_state(policy: PolicyModel, update: PolicyUpdate, path: str, world_size: int) -> None:
    """Optimizer, LR schedule, RNG (and LoRA adapter) from a checkpoint of `save_checkpoint`.
    The full fine-tuned weights come in earlier, as the model's initial weights."""
    out = Path(path)
    if policy.lora:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(policy.net, load_file(str(out / "adapter" / "adapter_model.safetensors")))
    state = torch.load(out / OPTIMIZER_FILE, weights_only=False)
    if policy.fsdp != ("optimizer_by_name" in state):
        saved, now = ("fsdp", "replicate") if "optimizer_by_name" in state else ("replicate", "fsdp")
        raise ValueError(f"{out / OPTIMIZER_FILE} holds the optimizer state of a learner.strategy = {saved} "
                         f"run; this run uses {now} (with {world_size} learner(s)). Resume with "
                         f"learner.strategy: {saved}.")
    if policy.fsdp:
        from rl.fsdp import load_full_optimizer_state

        load_full_optimizer_state(policy.net, update.optimizer, state["optimizer_by_name"])
    else:
        update.optimizer.load_state_dict(state["optimizer"])
    update.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
