"""Prompt features for the `egtp` length predictor: entropy-guided token pooling (EGTP).

One forward pass of the policy over a prompt gives, at every prompt position t, a hidden state
h_t and the entropy H_t of the next-token distribution (from the raw logits). EGTP pools

    f = sum_t w_t h_t,   w_t = H_t / sum_s H_s                       f: [hidden]

so the positions where the model is unsure what comes next, which tell most about how the
answer will unfold, weigh most. The predictor (scheduling/predictors.py) regresses log length
on f with a head trained online from finished samples.

Where the hidden states come from, and why: vLLM's generate path returns tokens and log-probs,
not hidden states, and the learner sees a prompt only after its rollout (it trains on the
finished samples), too late to schedule that rollout. So the rollout worker runs its own copy of
the model (transformers, on the worker's device) over each step's prompts before admission:
prompts only, batched, one forward per step. The copy holds the initial policy weights; the
head, trained on the current policy's lengths, follows the drift in what lengths mean.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


class PromptEncoder:
    """Entropy-pooled hidden states of prompts. `layer`: which hidden state (index into
    transformers' `hidden_states`, 0 = embeddings); None = the middle layer."""

    def __init__(self, model_path: str, dtype: str = "float32", layer: int | None = None,
                 device: str = "cpu", batch_size: int = 16) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.device = device
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, torch_dtype=getattr(torch, dtype)).to(device).eval()
        n_layers = int(self.model.config.num_hidden_layers)
        self.layer = n_layers // 2 if layer is None else int(layer)
        if not 0 <= self.layer <= n_layers:
            raise ValueError(f"layer {layer} outside 0..{n_layers} for {model_path}")
        self.batch_size = batch_size
        self.hidden_size = int(self.model.config.hidden_size)

    def encode(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """prompts: B lists of token ids -> [B, hidden] float32 EGTP features."""
        torch = self.torch
        out = np.zeros((len(prompts), self.hidden_size), dtype=np.float32)
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start:start + self.batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, p in enumerate(chunk):  # right padding: positions < len(p) are the prompt
                ids[i, :len(p)] = torch.tensor(list(p), dtype=torch.long)
                mask[i, :len(p)] = 1
            with torch.no_grad():
                res = self.model(ids.to(self.device), attention_mask=mask.to(self.device),
                                 output_hidden_states=True)
                logp = torch.log_softmax(res.logits.float(), dim=-1)  # [b, T, V]
                entropy = -(logp.exp() * logp).sum(-1) * mask.to(self.device)  # [b, T]
                weights = entropy / entropy.sum(-1, keepdim=True).clamp_min(1e-12)
                hidden = res.hidden_states[self.layer].float()  # [b, T, hidden]
                pooled = (weights.unsqueeze(-1) * hidden).sum(1)  # [b, hidden]
            out[start:start + len(chunk)] = pooled.cpu().numpy()
        return out
