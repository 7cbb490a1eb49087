"""FPTAS knapsack against exact solvers: (1 - eps) guarantee, capacity, edge cases."""

import numpy as np
import pytest

from scheduling.knapsack import exact_knapsack, fptas_knapsack


def _brute(values, weights, capacity):
    """Independent reference: enumerate all subsets (n <= 12)."""
    n = len(values)
    best = 0.0
    for mask in range(1 << n):
        sel = [i for i in range(n) if mask >> i & 1]
        if sum(weights[i] for i in sel) <= capacity:
            best = max(best, sum(values[i] for i in sel))
    return best


def test_exact_solver_matches_brute_force():
    rng = np.random.default_rng(7)
    for _ in range(200):
        n = int(rng.integers(0, 11))
        v = rng.integers(0, 50, n).astype(float)
        w = rng.integers(0, 40, n)
        cap = int(rng.integers(0, w.sum() + 3))
        sol = exact_knapsack(v, w, cap)
        assert w[sol].sum() <= cap
        assert v[sol].sum() == pytest.approx(_brute(v, w, cap))


@pytest.mark.parametrize("eps", [0.05, 0.2, 0.5])
def test_fptas_guarantee_on_random_instances(eps):
    rng = np.random.default_rng(int(eps * 100))
    ratios = []
    for trial in range(600):
        n = int(rng.integers(1, 16))
        if trial % 3 == 0:  # KV-like: value = length, weight = prompt + length
            v = rng.integers(1, 200, n).astype(float)
            w = v + rng.integers(1, 60, n)
        elif trial % 3 == 1:  # uncorrelated, with zero weights and zero values mixed in
            v = rng.integers(0, 100, n).astype(float)
            w = rng.integers(0, 100, n)
        else:  # a few huge items among many small: exercises the large/small split
            v = np.where(rng.random(n) < 0.2, rng.integers(500, 1000, n), rng.integers(1, 20, n))
            v = v.astype(float)
            w = rng.integers(1, 80, n)
        cap = int(rng.integers(0, w.sum() + 2))
        sol = fptas_knapsack(v, w, cap, eps)
        assert len(set(sol)) == len(sol) and all(0 <= i < n for i in sol)
        assert w[sol].sum() <= cap
        opt = v[exact_knapsack(v, w, cap)].sum()
        assert v[sol].sum() >= (1 - eps) * opt - 1e-9
        if opt > 0:
            ratios.append(v[sol].sum() / opt)
    assert len(ratios) > 300  # most instances are non-trivial, so the loop above tested something


def test_fptas_float_weights_against_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(150):
        n = int(rng.integers(1, 11))
        v = rng.uniform(0.1, 10, n)
        w = rng.uniform(0.1, 10, n)
        cap = float(rng.uniform(0, w.sum()))
        sol = fptas_knapsack(v, w, cap, 0.1)
        assert w[sol].sum() <= cap + 1e-9
        assert v[sol].sum() >= 0.9 * _brute(v, w, cap) - 1e-9


def test_edge_cases():
    # nothing fits
    assert fptas_knapsack([5, 6], [10, 11], 9, 0.05) == []
    # empty input
    assert fptas_knapsack([], [], 10, 0.05) == []
    # everything fits
    assert fptas_knapsack([1, 2, 3], [1, 1, 1], 3, 0.05) == [0, 1, 2]
    # zero-weight items with value are always taken, even at capacity 0
    assert fptas_knapsack([4, 1, 7], [0, 5, 0], 0, 0.05) == [0, 2]
    # zero-value items are never needed
    assert fptas_knapsack([0, 3], [1, 1], 1, 0.05) == [1]
    # the lone big item beats the greedy-by-ratio prefix (classic greedy trap)
    assert fptas_knapsack([2, 100], [1, 100], 100, 0.05) == [1]


def test_invalid_input():
    with pytest.raises(ValueError):
        fptas_knapsack([1], [1], 1, eps=0.0)
    with pytest.raises(ValueError):
        fptas_knapsack([1, 2], [1], 1)
    with pytest.raises(ValueError):
        fptas_knapsack([1], [-1], 1)


def test_large_instance_is_feasible_and_near_greedy_bound():
    """4,096 KV-like items: feasible, and within eps of the fractional upper bound."""
    rng = np.random.default_rng(0)
    length = np.clip(np.rint(rng.lognormal(np.log(128), 1.0, 4096)), 1, 4096)
    weight = rng.integers(16, 320, 4096) + length
    for frac in (0.25, 0.01, 0.001):
        cap = frac * weight.sum()
        sol = fptas_knapsack(length, weight, cap, 0.05)
        assert weight[sol].sum() <= cap
        # fractional bound: greedy prefix by ratio + fraction of the critical item >= OPT
        order = np.argsort(-length / weight, kind="stable")
        cw = np.cumsum(weight[order])
        k = int(np.searchsorted(cw, cap, side="right"))
        ub = length[order[:k]].sum() + length[order[k]] * (cap - (cw[k - 1] if k else 0)) / weight[order[k]]
        assert length[sol].sum() >= 0.95 * ub
