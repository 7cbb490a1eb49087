"""Micro-batches as tensors, in the three layouts `rl.logprobs.response_logprobs` takes, built
from token-id lists.

Whatever the layout, the objective-facing tensors come out the same: response_ids and
response_mask [n, T], each response right-aligned in the last columns.

padded: every row is left-padded to the micro-batch's longest prompt+response, so all
responses end at the last column. The model only needs logits for the last T + 1 positions
(`logits_to_keep`), not the prompts'.

    input_ids [n, L]   attention_mask [n, L]   response mask [n, T] (right-aligned)

packed: the n sequences sit back to back in ONE row of S = sum(L_i) tokens, no padding.
`position_ids` restart at 0 at each sequence and `attention_mask` is None, which makes
transformers' `create_causal_mask` build a block-diagonal causal mask
(`masking_utils.find_packed_sequence_indices`). `logits_to_keep` is the 1-D tensor of the K
positions whose logits predict a response token; `dest_rows`/`dest_cols` say where each of
their log-probs goes in [n, T].

    input_ids [1, S]   position_ids [1, S]   logits_index [K]   dest_rows/dest_cols [K]

shared_prompt, pass 2 (`ResponseMicroBatch`): responses grouped by length like the padded
layout, each pointing at its prompt's row of a `rl.logprobs.SharedPrompts` (pass 1, which
runs the model and so lives with `response_logprobs`).

    prompt_rows [n], continuation_ids [n, T - 1] (responses left-aligned minus their last token)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from rl.logprobs import SharedPrompts


class _TokenCounts:
    """Counts shared by the padded and packed layouts (they hold `input_ids` and `response_mask`)."""

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum())

    @property
    def num_processed_tokens(self) -> int:
        """Tokens the model runs over, padding included."""
        return self.input_ids.numel()

    @property
    def num_real_tokens(self) -> int:
        """Processed tokens that are not padding."""
        mask = getattr(self, "attention_mask", None)
        return int(mask.sum()) if mask is not None else self.input_ids.numel()


@dataclass
class MicroBatch(_TokenCounts):
    """Padded layout."""

    input_ids: Tensor       # [n, L] long, left-padded
    attention_mask: Tensor  # [n, L] long
    position_ids: Tensor    # [n, L] long, 0 at each row's first real token
    response_ids: Tensor    # [n, T] long, right-aligned, pad where mask is false
    response_mask: Tensor   # [n, T] bool


@dataclass
class PackedMicroBatch(_TokenCounts):
    """Packed layout: one row, no padding."""

    input_ids: Tensor      # [1, S] long, sequences back to back
    position_ids: Tensor   # [1, S] long, restarting at 0 for each sequence
    logits_index: Tensor   # [K] long, positions whose logits predict a response token
    targets: Tensor        # [K] long, the response token each of those positions predicts
    dest_rows: Tensor      # [K] long, where each log-prob goes in [n, T]
    dest_cols: Tensor      # [K] long
    response_ids: Tensor   # [n, T] long, right-aligned (as in MicroBatch)
    response_mask: Tensor  # [n, T] bool

    attention_mask = None  # the block-diagonal mask comes from position_ids


@dataclass
class ResponseMicroBatch:
    """shared_prompt layout, pass 2: responses whose prompts ran in `shared`."""

    shared: "SharedPrompts"
    prompt_rows: Tensor        # [n] long, row of each response's prompt in `shared`
    continuation_ids: Tensor   # [n, T - 1] long, response tokens 0..T-2, left-aligned, pad right
    continuation_mask: Tensor  # [n, T - 1] long
    response_lengths: Tensor   # [n] long
    response_ids: Tensor       # [n, T] long, right-aligned (as in MicroBatch)
    response_mask: Tensor      # [n, T] bool

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum())

    @property
    def num_processed_tokens(self) -> int:
        """Tokens pass 2 runs over, padding included (pass 1 counts in `shared`)."""
        return self.continuation_ids.numel()

    @property
    def num_real_tokens(self) -> int:
        return int(self.continuation_mask.sum())


def right_align(rows: list[list[float]], width: int, fill: float = 0.0,
                dtype: torch.dtype = torch.float32) -> Tensor:
    """Right-align variable-length rows into a [len(rows), width] tensor."""
    out = torch.full((len(rows), width), fill, dtype=dtype)
    for i, row in enumerate(rows):
        if row:
            out[i, width - len(row):] = torch.as_tensor(row, dtype=dtype)
    return out


def _right_aligned_responses(responses: list[list[int]], T: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """response_ids [n, T] long (right-aligned, pad elsewhere) and response_mask [n, T] bool."""
    response_ids = right_align([list(map(float, r)) for r in responses], T, pad_id, torch.long)
    response_mask = right_align([[1.0] * len(r) for r in responses], T, 0, torch.long).bool()
    return response_ids, response_mask


def make_micro_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> MicroBatch:
    """Build the left-padded layout from token-id lists (responses may be empty)."""
    full = [p + r for p, r in zip(prompts, responses)]
    width = max(len(x) for x in full)
    T = max(1, max(len(r) for r in responses))
    input_ids = right_align([list(map(float, x)) for x in full], width, pad_id, torch.long)
    attention_mask = right_align([[1.0] * len(x) for x in full], width, 0, torch.long)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    response_ids, response_mask = _right_aligned_responses(responses, T, pad_id)
    return MicroBatch(input_ids, attention_mask, position_ids, response_ids, response_mask)


def make_packed_micro_batch(prompts: list[list[int]], responses: list[list[int]],
                            pad_id: int) -> PackedMicroBatch:
    """Build the packed layout. Every prompt must be non-empty (its last token predicts the
    first response token)."""
    T = max(1, max(len(r) for r in responses))
    ids: list[int] = []
    pos: list[int] = []
    logits_index: list[int] = []
    dest_rows: list[int] = []
    dest_cols: list[int] = []
    for row, (p, r) in enumerate(zip(prompts, responses)):
        if not p:
            raise ValueError("packed layout needs a non-empty prompt for every sequence")
        start = len(ids)
        ids += p + r
        pos += range(len(p) + len(r))
        # Response token j sits at start + len(p) + j and is predicted by the position before it.
        first = start + len(p) - 1
        logits_index += range(first, first + len(r))
        dest_rows += [row] * len(r)
        dest_cols += range(T - len(r), T)
    response_ids, response_mask = _right_aligned_responses(responses, T, pad_id)
    targets = response_ids[dest_rows, dest_cols] if dest_rows else torch.zeros(0, dtype=torch.long)
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return PackedMicroBatch(as_long([ids]), as_long([pos]), as_long(logits_index), targets,
                            as_long(dest_rows), as_long(dest_cols), response_ids, response_mask)


def make_response_micro_batch(shared: "SharedPrompts", prompt_rows: list[int],
                             responses: list[list[int]], pad_id: int) -> ResponseMicroBatch:
    """Pass-2 micro-batch: `responses[i]` continues prompt row `prompt_rows[i]` of `shared`."""
    T = max(1, max(len(r) for r in responses))
    continuation_ids = torch.full((len(responses), T - 1), pad_id, dtype=torch.long)
    continuation_mask = torch.zeros((len(responses), T - 1), dtype=torch.long)
    for i, r in enumerate(responses):
        head = r[:-1]
        if head:
            continuation_ids[i, :len(head)] = torch.as_tensor(head, dtype=torch.long)
            continuation_mask[i, :len(head)] = 1
    response_ids, response_mask = _right_aligned_responses(responses, T, pad_id)
    return ResponseMicroBatch(shared, torch.tensor(prompt_rows, dtype=torch.long), continuation_ids,
                              continuation_mask, torch.tensor([len(r) for r in responses], dtype=torch.long),
                              response_ids, response_mask)


LAYOUTS = ("padded", "packed", "shared_prompt")


def build_micro_batch(layout: str, prompts: list[list[int]], responses: list[list[int]],
                      pad_id: int) -> MicroBatch | PackedMicroBatch:
    """`layout` is "padded" or "packed"."""
    if layout == "packed":
        return make_packed_micro_batch(prompts, responses, pad_id)
    if layout == "padded":
        return make_micro_batch(prompts, responses, pad_id)
    if layout == "shared_prompt":
        raise ValueError("shared_prompt micro-batches come from SharedPrompts + make_response_micro_batch")
    raise ValueError(f"unknown micro-batch layout {layout!r}: use one of {', '.join(LAYOUTS)}")
