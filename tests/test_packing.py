"""Token-budget micro-batches and data-parallel shards."""

import random

from rl.packing import pack_micro_batches, padding_fraction, split_across_ranks


def test_every_index_once_and_budget_respected():
    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 80))]
        budget = rng.randint(300, 3000)
        batches = pack_micro_batches(lengths, budget)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        for b in batches:
            assert len(b) * max(lengths[i] for i in b) <= budget


def test_oversized_sequence_alone():
    batches = pack_micro_batches([50, 500, 40], token_budget=100)
    assert [1] in batches
    assert all(len(b) * max([50, 500, 40][i] for i in b) <= 100 for b in batches if b != [1])


def test_sorted_packing_keeps_padding_small():
    rng = random.Random(1)
    lengths = [rng.randint(20, 200) for _ in range(64)]
    batches = pack_micro_batches(lengths, 4096)
    # Sorting makes neighbours similar: padding stays a few percent (unsorted packing of this
    # distribution wastes ~40%).
    assert padding_fraction(lengths, batches) < 0.10
    naive = [list(range(i, min(i + 16, 64))) for i in range(0, 64, 16)]
    assert padding_fraction(lengths, naive) > 0.25


def test_padding_fraction_worked_example():
    # one batch of lengths 4 and 2: processed 2 * 4 = 8, real 6 -> 2/8
    assert padding_fraction([4, 2], [[0, 1]]) == 0.25


def test_split_across_ranks_balances_tokens():
    rng = random.Random(2)
    for world in (2, 3, 4):
        lengths = [rng.randint(1, 200) for _ in range(50)]
        shards = split_across_ranks(lengths, world)
        assert sorted(i for s in shards for i in s) == list(range(50))
        loads = [sum(lengths[i] for i in s) for s in shards]
        # Longest-first onto the least-loaded rank: loads differ by at most one sequence.
        assert max(loads) - min(loads) <= max(lengths)
    # worked case: [100, 90, 80, 10, 10, 10] -> {100, 10, 10, 10} and {90, 80}, the optimum
    shards = split_across_ranks([100, 90, 80, 10, 10, 10], 2)
    assert sorted(map(sorted, shards)) == [[0, 3, 4, 5], [1, 2]]
