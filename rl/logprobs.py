"""Per-token log-probs of responses under a causal LM, on left-padded micro-batches.

Layout: every row is left-padded to the micro-batch's longest prompt+response, so all
responses end at the last column and sit right-aligned in the last T columns. The model
then only needs logits for the last T + 1 positions (`logits_to_keep`), not the prompts'.

    input_ids [n, L]   attention_mask [n, L]   response mask [n, T] (right-aligned)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class MicroBatch:
    input_ids: Tensor       # [n, L] long, left-padded
    attention_mask: Tensor  # [n, L] long
    position_ids: Tensor    # [n, L] long, 0 at each row's first real token
    response_ids: Tensor    # [n, T] long, right-aligned, pad where mask is false
    response_mask: Tensor   # [n, T] bool

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum())


def right_align(rows: list[list[float]], width: int, fill: float = 0.0,
                dtype: torch.dtype = torch.float32) -> Tensor:
    """Right-align variable-length rows into a [len(rows), width] tensor."""
    out = torch.full((len(rows), width), fill, dtype=dtype)
    for i, row in enumerate(rows):
        if row:
            out[i, width - len(row):] = torch.as_tensor(row, dtype=dtype)
    return out


def make_micro_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> MicroBatch:
    """Build the left-padded layout from token-id lists (responses may be empty)."""
    full = [p + r for p, r in zip(prompts, responses)]
    width = max(len(x) for x in full)
    T = max(1, max(len(r) for r in responses))
    input_ids = right_align([list(map(float, x)) for x in full], width, pad_id, torch.long)
    attention_mask = right_align([[1.0] * len(x) for x in full], width, 0, torch.long)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    response_ids = right_align([list(map(float, r)) for r in responses], T, pad_id, torch.long)
    response_mask = right_align([[1.0] * len(r) for r in responses], T, 0, torch.long).bool()
    return MicroBatch(input_ids, attention_mask, position_ids, response_ids, response_mask)


def response_logprobs(model, mb: MicroBatch, temperature: float = 1.0,
                      with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """Log-probs [n, T] of the response tokens (and entropies [n, T], no gradient).

    Logits are divided by `temperature` so the learner scores the distribution the rollout
    sampled from. Masked positions hold 0.
    """
    T = mb.response_ids.shape[1]
    out = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                position_ids=mb.position_ids, logits_to_keep=T + 1, use_cache=False)
    # Logit column j predicts the token in column j + 1: the first T predict the response.
    logits = out.logits[:, :T].float()
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, mb.response_ids.unsqueeze(-1)).squeeze(-1)
    logp = logp.masked_fill(~mb.response_mask, 0.0)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1).masked_fill(~mb.response_mask, 0.0)
    return logp, entropy
