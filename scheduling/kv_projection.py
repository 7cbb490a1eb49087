"""Projected KV over time: the peak a set of sequences will reach if each runs its predicted length.

Conservative admission reserves every sequence's peak at once (sum of prompt + predicted
length). But sequences end at different steps, and KV freed by a short one is reused by a long
one that is still growing, so the cache's true peak is lower. With predicted remaining steps
r_j and KV k_j now, sequence j holds k_j + t tokens at step t <= r_j and nothing after, so

    KV(t) = sum_{j : r_j >= t} (k_j + t)

rises between finishing times and drops at each one: its maximum is at some t = r_j. Sorting
by r descending, the peak is max_m (sum_{i <= m} k_i + (m + 1) r_m), O(n log n).

vLLM's cache also differs from our per-sequence accounting in two ways that the projection
models when asked (`block_tokens`, `share_prompts`):
  * KV lives in blocks of `block_tokens`: a sequence holds ceil(tokens / B) blocks, about B / 2
    tokens more than its count on average (added per sequence).
  * siblings of one prompt share the prompt's full blocks (prefix caching): the shared part is
    held until the last sibling ends, so it is charged once, to the sibling predicted to end
    last.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .types import Seq


def projected_peak(kv_now: np.ndarray, remaining: np.ndarray, horizon: float | None = None) -> float:
    """Largest KV over the coming steps (the next `horizon` steps; None: all). kv_now [n] tokens
    held now; remaining [n] steps each still runs (>= 0). 0 for an empty set."""
    if kv_now.size == 0:
        return 0.0
    if horizon is not None:
        # a sequence running past the horizon counts as ending at it; so does the peak
        remaining = np.minimum(remaining, horizon)
    order = np.argsort(-remaining, kind="stable")
    r = remaining[order]
    held = np.cumsum(kv_now[order]) + np.arange(1, r.size + 1) * r
    return float(held.max())


def engine_kv_now(seqs: Sequence[Seq], remaining: np.ndarray, block_tokens: int,
                  share_prompts: bool) -> np.ndarray:
    """KV each sequence is charged now, the engine's way (see the module docstring).
    seqs [n], remaining [n] predicted steps left -> [n] tokens."""
    kv = np.array([s.kv_tokens for s in seqs], dtype=float)
    if block_tokens > 1:
        kv += block_tokens / 2  # the partly filled last block, on average
    if share_prompts and block_tokens >= 1:
        last_of_group: dict = {}
        for i, s in enumerate(seqs):
            j = last_of_group.get(s.group_id)
            if j is None or remaining[i] > remaining[j]:
                last_of_group[s.group_id] = i
        for i, s in enumerate(seqs):
            shared = (s.prompt_tokens // block_tokens) * block_tokens
            if last_of_group[s.group_id] != i:
                kv[i] -= shared
    return kv
