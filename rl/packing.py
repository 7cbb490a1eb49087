"""Split a batch of variable-length sequences across data-parallel ranks and into micro-batches.

Micro-batches are padded rectangles [n, L_max]; sorting by length before filling them keeps
the padding small, and the token budget bounds n * L_max (what memory actually holds).
"""

from __future__ import annotations


def split_across_ranks(lengths: list[int], world_size: int) -> list[list[int]]:
    """Indices per rank, balancing total tokens (longest first onto the least-loaded rank)."""
    loads = [0] * world_size
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = min(range(world_size), key=lambda r: (loads[r], len(shards[r])))
        shards[r].append(i)
        loads[r] += lengths[i]
    return [sorted(s) for s in shards]


def pack_micro_batches(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Group sequence indices so each group's padded size n * max_len stays <= token_budget.

    A sequence longer than the budget gets a micro-batch of its own (it cannot be split).
    Returns groups in descending-length order.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # Sorted descending, so the first index of `current` holds its max length.
        if current and (len(current) + 1) * lengths[current[0]] > token_budget:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def padding_fraction(lengths: list[int], batches: list[list[int]]) -> float:
    """Share of processed (padded) tokens that are padding."""
    processed = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    real = sum(lengths[i] for b in batches for i in b)
    return 0.0 if processed == 0 else (processed - real) / processed
