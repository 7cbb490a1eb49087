"""A rank's sequences cut into micro-batches under a token budget, in the configured layout
(rl/logprobs.py): shared_prompt (a group's prompt runs once, its responses in padded
micro-batches against its KV cache), padded rectangles, or packed rows without padding."""

from __future__ import annotations

from dataclasses import replace

import torch

from rl.learner.model import PolicyModel
from rl.logprobs import SharedPrompts, build_micro_batch, make_response_micro_batch
from rl.packing import pack_micro_batches, pack_sequences, prompt_chunks


class MicroBatcher:
    def __init__(self, policy: PolicyModel, layout: str, micro_batch_tokens: int, packed_row_tokens: int):
        self.policy = policy
        self.layout = layout
        self.micro_batch_tokens = micro_batch_tokens
        self.packed_row_tokens = packed_row_tokens

    def plan(self, prompts: list[list[int]], responses: list[list[int]]) -> list[list[int]]:
        """Sequence indices per micro-batch under the token budget (padded and packed layouts)."""
        lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
        if self.layout == "packed":
            return pack_sequences(lengths, min(self.micro_batch_tokens, self.packed_row_tokens))
        return pack_micro_batches(lengths, self.micro_batch_tokens)

    def __call__(self, prompts: list[list[int]], responses: list[list[int]], with_ref: bool = False):
        """Yield (indices, micro-batch, reference micro-batch or None, pass-1 token counts).

        shared_prompt: per chunk of whole prompt groups, pass 1 runs the chunk's distinct
        prompts once (under autocast; and once more on the reference policy when `with_ref`);
        its micro-batches follow, then ONE backward through pass 1 once the caller has run
        the chunk's last micro-batch backward (a no-op under no_grad). The pass-1 token counts
        (processed, real) come with the chunk's first micro-batch, (0, 0) otherwise.
        """
        policy = self.policy
        if self.layout != "shared_prompt":
            for idx in self.plan(prompts, responses):
                mb = policy.to_device(build_micro_batch(self.layout, [prompts[i] for i in idx],
                                                        [responses[i] for i in idx], policy.pad_id))
                yield idx, mb, (mb if with_ref else None), (0, 0)
            return
        for chunk in prompt_chunks(prompts, self.micro_batch_tokens):
            rows: dict[tuple[int, ...], int] = {}
            for i in chunk:
                rows.setdefault(tuple(prompts[i]), len(rows))
            distinct = [list(p) for p in rows]
            with policy.autocast():
                shared = SharedPrompts(policy.net, distinct, policy.pad_id)
                ref_shared = None
                if with_ref:
                    ref_model, ctx = policy.reference()
                    with torch.no_grad(), ctx:
                        ref_shared = SharedPrompts(ref_model, distinct, policy.pad_id)
            counts = (shared.num_processed_tokens, shared.num_real_tokens)
            for group in pack_micro_batches([len(responses[i]) for i in chunk], self.micro_batch_tokens):
                idx = [chunk[j] for j in group]
                mb = policy.to_device(make_response_micro_batch(
                    shared, [rows[tuple(prompts[i])] for i in idx], [responses[i] for i in idx], policy.pad_id))
                yield idx, mb, (replace(mb, shared=ref_shared) if with_ref else None), counts
                counts = (0, 0)
            shared.backward()
