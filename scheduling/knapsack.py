"""0/1 knapsack: a fast FPTAS (numpy) for the global grouping, and exact solvers for the tests.

`fptas_knapsack` follows the classic Ibarra-Kim / Lawler refinement of profit scaling: a greedy
lower bound, a profit-indexed DP only over the "large" items, "small" items filled in greedily
by value/weight ratio. See its docstring for why the (1 - eps) guarantee holds.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import numpy as np


def _validate(values: Sequence[float], weights: Sequence[float], capacity: float):
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if v.shape != w.shape:
        raise ValueError(f"values ({v.size}) and weights ({w.size}) differ in length")
    if not (np.all(np.isfinite(v)) and np.all(np.isfinite(w))):
        raise ValueError("values and weights must be finite")
    if np.any(w < 0):
        raise ValueError("weights must be >= 0")
    if not math.isfinite(capacity):
        raise ValueError("capacity must be finite")
    return v, w


def _greedy_order(v: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Indices by decreasing value/weight, ties by index (stable: siblings stay adjacent)."""
    ratio = v / np.maximum(w, 1e-300)
    return np.lexsort((np.arange(v.size), -ratio))


def fptas_knapsack(
    values: Sequence[float], weights: Sequence[float], capacity: float, eps: float = 0.05
) -> list[int]:
    """Indices (sorted) of a subset with total weight <= capacity and value >= (1 - eps) * OPT.

    Steps (n items, all arrays numpy):
      0. Items with value <= 0 or weight > capacity never help and are dropped; weight-0 items
         with positive value are always taken; if everything left fits, take everything.
      1. Greedy by value/weight gives LB = max(greedy prefix, best single item). The fractional
         bound UB (prefix + fraction of the critical item) satisfies OPT <= UB <= 2 * LB.
      2. T = eps * LB / 2 splits items: "large" v_i > T, "small" v_i <= T. Large profits are
         scaled, p_i = floor(v_i / K) with K = eps * T / 2, and a DP over scaled profit
         P <= UB / K (at most 8 / eps^2 cells) keeps the minimum weight reaching exactly P.
         Per scaled profit p only the floor(Pmax / p) lightest large items can ever be used
         together, so the rest are dropped before the DP (Lawler's reduction).
      3. For every reachable P, the residual capacity is filled with the greedy prefix of the
         small items (vectorized with cumulative sums + searchsorted); the best total wins.
         A final pass adds any further item that still fits (never hurts).

    Why (1 - eps) holds. Let O be an optimal set, O_L its large and O_S its small items.
      * The DP entry for P = sum of p_i over O_L holds a set A with w(A) <= w(O_L) and
        v(A) >= K * P >= v(O_L) - K * |O_L|. Every large item is worth > T, so
        |O_L| < OPT / T and the rounding loss is < K * OPT / T = eps * OPT / 2.
      * The residual capacity C - w(A) >= w(O_S), so the fractional optimum of the small items
        in it is >= v(O_S); the greedy prefix loses at most one small item, i.e. <= T
        = eps * LB / 2 <= eps * OPT / 2.
      Together the candidate for that P has value >= OPT - eps * OPT, and we return the best
      candidate. Cost: O(n log n) for sorting plus O(n_large * 8 / eps^2) vector work.
    """
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    v, w = _validate(values, weights, capacity)
    n = v.size
    idx_all = np.arange(n)
    free = (w == 0) & (v > 0)  # cost nothing: always take
    cand = (w > 0) & (v > 0) & (w <= capacity)
    chosen = list(idx_all[free])
    ci = idx_all[cand]
    if ci.size == 0:
        return sorted(int(i) for i in chosen)
    cv, cw = v[ci], w[ci]
    if cw.sum() <= capacity:
        return sorted(int(i) for i in np.concatenate([idx_all[free], ci]))

    # 1. greedy lower / fractional upper bound
    order = _greedy_order(cv, cw)
    cumw = np.cumsum(cw[order])
    k = int(np.searchsorted(cumw, capacity, side="right"))  # prefix of k items fits
    prefix_v = float(cv[order[:k]].sum())
    rest = capacity - (cumw[k - 1] if k > 0 else 0.0)
    ub = prefix_v + (cv[order[k]] * rest / cw[order[k]] if k < ci.size else 0.0)
    best_single = int(np.argmax(cv))
    lb = max(prefix_v, float(cv[best_single]))
    greedy_sol = order[:k] if prefix_v >= cv[best_single] else np.array([best_single])

    # 2. large / small split and profit scaling
    t = eps * lb / 2.0
    kscale = eps * t / 2.0
    pmax = int(math.floor(ub / kscale))
    large = np.flatnonzero(cv > t)
    small = np.flatnonzero(cv <= t)
    p_all = np.floor(cv[large] / kscale).astype(np.int64)
    # Lawler's reduction: within equal scaled profit p keep the floor(pmax / p) lightest items
    lo = np.lexsort((large, cw[large], p_all))
    large, p_all = large[lo], p_all[lo]
    if large.size:
        starts = np.r_[0, np.flatnonzero(np.diff(p_all)) + 1]
        run_start = np.repeat(starts, np.diff(np.r_[starts, large.size]))
        rank = np.arange(large.size) - run_start
        keep = rank < (pmax // p_all)
        large, p_all = large[keep], p_all[keep]

    inf = np.inf
    dpw = np.full(pmax + 1, inf)
    dpv = np.zeros(pmax + 1)
    dpw[0] = 0.0
    took = np.zeros((large.size, pmax + 1), dtype=bool)
    hi = 0  # highest reachable scaled profit so far: restricts every update to a short slice
    for r, (i, p) in enumerate(zip(large.tolist(), p_all.tolist())):
        top = min(hi + p, pmax)
        if p > top:
            continue
        src_w = dpw[0 : top - p + 1] + cw[i]
        dst = slice(p, top + 1)
        better = src_w < dpw[dst]
        better &= src_w <= capacity
        if better.any():
            src_v = dpv[0 : top - p + 1] + cv[i]
            dpw[dst] = np.where(better, src_w, dpw[dst])
            dpv[dst] = np.where(better, src_v, dpv[dst])
            took[r, dst] = better
            hi = max(hi, p + int(np.flatnonzero(better)[-1]))

    # 3. greedy prefix of small items in every residual capacity, all P at once
    s_order = small[_greedy_order(cv[small], cw[small])]
    s_cumw = np.r_[0.0, np.cumsum(cw[s_order])]
    s_cumv = np.r_[0.0, np.cumsum(cv[s_order])]
    reach = np.flatnonzero(np.isfinite(dpw))
    n_small = np.searchsorted(s_cumw, capacity - dpw[reach], side="right") - 1
    totals = dpv[reach] + s_cumv[n_small]
    j = int(np.argmax(totals))
    sol: list[int] = []
    pcur = int(reach[j])
    for r in range(large.size - 1, -1, -1):  # backtrack the DP table
        if pcur > 0 and took[r, pcur]:
            sol.append(int(large[r]))
            pcur -= int(p_all[r])
    sol.extend(int(x) for x in s_order[: n_small[j]])
    if totals[j] < float(cv[greedy_sol].sum()):
        # the guarantee is (1 - eps) * OPT, so the plain greedy answer can occasionally be better
        sol = [int(x) for x in greedy_sol]

    # final pass: add anything that still fits, best ratio first
    in_sol = np.zeros(ci.size, dtype=bool)
    in_sol[sol] = True
    room = capacity - float(cw[in_sol].sum())
    for x in order.tolist():
        if not in_sol[x] and cw[x] <= room:
            in_sol[x] = True
            room -= cw[x]
    return sorted(int(i) for i in np.concatenate([idx_all[free], ci[in_sol]]))


def exact_knapsack(values: Sequence[float], weights: Sequence[float], capacity: float) -> list[int]:
    """Optimal subset. DP over capacity when weights and capacity are integers (O(n * C)),
    else brute force (n <= 20). Reference solver for the tests, not for production use."""
    v, w = _validate(values, weights, capacity)
    n = v.size
    if capacity < 0:
        return []
    integral = np.all(w == np.round(w)) and float(capacity) == math.floor(capacity)
    if integral and capacity <= 200_000:
        cap = int(capacity)
        best = np.zeros(cap + 1)
        took = np.zeros((n, cap + 1), dtype=bool)
        for i in range(n):
            wi = int(w[i])
            if v[i] <= 0 or wi > cap:
                continue
            cand = np.full(cap + 1, -np.inf)
            cand[wi:] = best[: cap + 1 - wi] + v[i]
            better = cand > best
            best = np.where(better, cand, best)
            took[i] = better
        sol, c = [], cap
        for i in range(n - 1, -1, -1):
            if took[i, c]:
                sol.append(i)
                c -= int(w[i])
        return sorted(sol)
    if n > 20:
        raise ValueError("exact_knapsack: non-integral instance with more than 20 items")
    best_v, best_s = 0.0, ()
    for r in range(n + 1):
        for s in itertools.combinations(range(n), r):
            if w[list(s)].sum() <= capacity and v[list(s)].sum() > best_v:
                best_v, best_s = float(v[list(s)].sum()), s
    return sorted(best_s)
