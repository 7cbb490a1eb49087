"""Functions that run inside the vLLM worker (via `collective_rpc`) to load new weights."""

from __future__ import annotations

from typing import Any


def load_weights_into_worker(worker: Any, named_tensors: dict) -> int:
    """Reload the model's weights in place from HF-named tensors; returns the tensor count.

    Tied embeddings: the CPU backend packs `lm_head` into a kernel-specific copy when the
    model loads. `reload_weights` re-processes only the layers whose weights it loaded, and a
    tied `lm_head` loads nothing of its own (it shares `embed_tokens.weight`), so its packed
    copy keeps the old embedding: log-probs were off by ~1.1 after one update of SmolLM2.
    Re-running the lm_head's post-load processing repacks it from the shared weight.
    """
    worker.reload_weights(weights_iterator=iter(named_tensors.items()))
    model = worker.model_runner.get_model()
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        lm_head = getattr(model, "lm_head", None)
        method = getattr(lm_head, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(lm_head)
    return len(named_tensors)


def lm_head_staleness(worker: Any) -> float:
    """Max |lm_head(x) - x @ W^T| on a random probe: > 0 beyond rounding means a stale packed copy."""
    import torch

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
