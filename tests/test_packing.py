"""Token-budget micro-batches and data-parallel shards."""

import random

from rl.packing import (
    pack_micro_batches,
    pack_sequences,
    padding_fraction,
    prompt_chunks,
    split_across_ranks,
)


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


def test_split_across_ranks_keeps_groups_together():
    # groups a: 100 + 10 = 110, b: 90 + 10 = 100, c: 80 + 10 = 90 -> {a} and {b, c}
    lengths = [100, 10, 90, 10, 80, 10]
    groups = ["a", "a", "b", "b", "c", "c"]
    shards = split_across_ranks(lengths, 2, groups)
    assert sorted(map(sorted, shards)) == [[0, 1], [2, 3, 4, 5]]
    rng = random.Random(3)
    groups = [g for g in range(12) for _ in range(8)]
    lengths = [rng.randint(1, 200) for _ in groups]
    for world in (2, 3, 4):
        shards = split_across_ranks(lengths, world, groups)
        assert sorted(i for s in shards for i in s) == list(range(len(groups)))
        assert all(len({groups[i] for i in s}) == len(s) // 8 for s in shards)  # whole groups
    # fewer groups than ranks: sequences are split one by one, no rank left empty
    shards = split_across_ranks([5, 6, 7, 8], 4, [0, 0, 1, 1])
    assert sorted(map(len, shards)) == [1, 1, 1, 1]


# --- packed layout: first-fit decreasing by real token count --------------------------------

def test_pack_sequences_every_index_once_and_budget_respected():
    rng = random.Random(3)
    for _ in range(50):
        lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 80))]
        budget = rng.randint(300, 3000)
        bins = pack_sequences(lengths, budget)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        for b in bins:
            assert sum(lengths[i] for i in b) <= budget
        # First fit never leaves two bins at most half full (the later one's items would
        # have fit into the earlier one), so rows stay dense: bins <= 2 * total / budget + 1.
        loads = [sum(lengths[i] for i in b) for b in bins]
        assert sum(load <= budget / 2 for load in loads) <= 1


def test_pack_sequences_worked_example():
    # Decreasing order 60, 50, 40, 30, 20 under budget 100:
    # 60 -> bin0 (60); 50 -> bin1 (50); 40 -> bin0 (100); 30 -> bin1 (80); 20 -> bin1 (100).
    bins = pack_sequences([20, 40, 60, 30, 50], 100)
    assert bins == [[2, 1], [4, 3, 0]]


def test_pack_sequences_oversized_alone():
    bins = pack_sequences([50, 500, 40], 100)
    assert [1] in bins and [0, 2] in bins


def test_packed_has_no_padding_and_less_than_padded():
    rng = random.Random(4)
    lengths = [rng.randint(2, 128) + 40 for _ in range(64)]  # long-tailed responses after a prompt
    packed = pack_sequences(lengths, 2048)
    padded = pack_micro_batches(lengths, 2048)
    # a packed row holds its sequences back to back: tokens processed = real tokens
    assert all(sum(lengths[i] for i in row) <= 2048 for row in packed)
    assert sum(lengths[i] for row in packed for i in row) == sum(lengths)
    assert padding_fraction(lengths, padded) > 0


# --- shared_prompt: chunks of whole prompt groups for one prompt pass each ---------------------

def test_prompt_chunks_keep_groups_whole_and_bound_the_prompt_pass():
    rng = random.Random(0)
    for trial in range(30):
        prompts = []
        for g in range(rng.randint(1, 12)):
            prompt = [g] * rng.randint(1, 60)
            prompts += [prompt] * rng.randint(1, 8)
        rng.shuffle(prompts)  # groups need not arrive consecutively
        budget = rng.choice([40, 120, 2000])
        chunks = prompt_chunks(prompts, budget)
        assert sorted(i for c in chunks for i in c) == list(range(len(prompts)))
        where = {}
        for c, chunk in enumerate(chunks):
            for i in chunk:
                assert where.setdefault(tuple(prompts[i]), c) == c  # a prompt's samples in one chunk
            distinct = {tuple(prompts[i]) for i in chunk}
            size = len(distinct) * max(len(p) for p in distinct)
            assert size <= budget or len(distinct) == 1, (trial, size)


def test_prompt_chunks_worked_example():
    # prompts of 10, 10 and 30 tokens, 2 samples each; the pass over all three is 3 * 30 = 90
    prompts = [[1] * 10, [1] * 10, [2] * 10, [2] * 10, [3] * 30, [3] * 30]
    assert prompt_chunks(prompts, 90) == [[0, 1, 2, 3, 4, 5]]
    assert prompt_chunks(prompts, 89) == [[0, 1, 2, 3], [4, 5]]
    assert prompt_chunks(prompts, 10) == [[0, 1], [2, 3], [4, 5]]  # 30 > 10: alone
