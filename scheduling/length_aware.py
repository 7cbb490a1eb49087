"""`length_aware`: predicted lengths, FPTAS packing under the KV budget, SJF refill.

Reservation accounting: a running sequence reserves its predicted peak KV, prompt + generated +
predicted remaining (revised upward as it outlives its prediction); a pending one reserves
prompt + predicted length. A plan keeps the sum of reservations <= the KV budget, and the number
of running sequences <= slots. Actual KV (prompt + generated) never exceeds the reservation, so
the budget can only be overrun when sequences outlive their predictions.

Optimistic admission (`admission="optimistic"`, the default) then admits more pending
sequences, shortest first by their tail-quantile length, while the KV projected over the next
`admission_horizon` decode steps stays within the budget (scheduling/kv_projection.py, charged
the engine's way: blocks and shared prompt blocks). Reserving every sequence's whole peak
leaves much of the cache idle while short sequences finish; a short horizon keeps it full, and
when sequences outgrow the cache vLLM preempts the most recently scheduled one, whose KV is the
cheapest to recompute (docs/BENCHMARKS.md compares both in a capped engine).
`admission="conservative"` keeps the sum-of-peaks rule, for the ablation.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .base import SchedulingPolicy, register_policy
from .knapsack import fptas_knapsack
from .kv_projection import engine_kv_now, projected_peak
from .predictors import LengthPredictor, make_predictor
from .types import Seq, SeqId


ADMISSIONS = ("optimistic", "conservative")


@register_policy
class LengthAwarePolicy(SchedulingPolicy):
    """Global grouping by FPTAS, then shortest-predicted-remaining-first refill.

    * Grouping (nothing running, or free reserved KV >= `regroup_fraction` * budget): a 0/1
      knapsack over the pending sequences, value = predicted output tokens (tokens in flight),
      weight = predicted peak KV, capacity = free KV, eps = `eps`. When the slots bind before the
      KV does, the highest-value sequences that fit win (optimal for that case).
    * Refill (otherwise): pending sequences by shortest predicted remaining length, each admitted
      if it fits, so short ones turn KV over quickly (shortest job first).
    * Tail guard (`tail_guard`, checked before both paths whenever something runs): SJF alone
      starts the longest sequences last and they then set the makespan (worked case: 2 slots,
      lengths [10, 2, 8, 4]: SJF 14 steps, optimum 12). With D = projected lower bound on the
      remaining steps (from predicted means) and delta = steps until the next running sequence
      is predicted to finish, a pending sequence whose `tail_quantile` remaining length exceeds
      D - delta is urgent: urgent ones go first, riskiest first, then SJF; if the first urgent
      one does not fit, only sequences predicted to finish before it could start are admitted
      (EASY backfilling), so it is not starved. A quantile, not the mean: with long-tailed
      lengths the samples that set the makespan are those that *may* run long.
    * Ties (equal predictions, e.g. samples of the same prompt) keep arrival order, so siblings
      of a micro-group are admitted together and share the prompt's cached prefix.
    """

    name = "length_aware"

    def __init__(
        self,
        predictor: LengthPredictor | str = "token_conditioned",
        eps: float = 0.05,
        regroup_fraction: float = 0.5,
        tail_guard: bool = True,
        tail_quantile: float = 0.9,
        admission: str = "optimistic",
        admission_horizon: int = 16,
        **predictor_kw,
    ) -> None:
        if not 0.0 < regroup_fraction <= 1.0:
            raise ValueError(f"regroup_fraction must be in (0, 1], got {regroup_fraction}")
        self.predictor = (
            make_predictor(predictor, **predictor_kw) if isinstance(predictor, str) else predictor
        )
        self.eps = eps
        self.regroup_fraction = regroup_fraction
        self.tail_guard = tail_guard
        if not 0.0 < tail_quantile < 1.0:
            raise ValueError(f"tail_quantile must be in (0, 1), got {tail_quantile}")
        self.tail_quantile = tail_quantile
        if admission not in ADMISSIONS:
            raise ValueError(f"admission must be one of {ADMISSIONS}, got {admission!r}")
        self.admission = admission
        if admission_horizon < 1:
            raise ValueError(f"admission_horizon must be >= 1 decode step, got {admission_horizon}")
        self.admission_horizon = admission_horizon
        # the engine's KV layout, for the optimistic projection (set_kv_layout); by default our
        # own accounting: every token counted, each sequence its own prompt
        self.block_tokens = 1
        self.share_prompts = False
        self.last_mode = ""  # "group" or "refill": which path the latest plan took (for tests/logs)

    def set_kv_layout(self, block_tokens: int, share_prompts: bool) -> None:
        """The engine keeps KV in blocks of `block_tokens` and, with `share_prompts` (prefix
        caching), siblings share the prompt's full blocks: the optimistic projection charges KV
        the engine's way. The executor and the simulator call this; conservative plans ignore it."""
        self.block_tokens = max(int(block_tokens), 1)
        self.share_prompts = bool(share_prompts)

    def begin_rollout(self, seqs: Sequence[Seq]) -> None:
        self.predictor.begin_rollout()

    def on_finished(self, seq: Seq, length: int) -> None:
        self.predictor.observe(seq, length)

    # -----------------------------------------------------------------------------------------
    def _remaining(self, seqs: Sequence[Seq], q: float | None = None) -> np.ndarray:
        """Predicted remaining tokens; for a group-level predictor, samples of one prompt at the
        same progress share one call (a plan then costs O(B) predictions, not O(B * G)).
        q None: the mean; else the q-quantile."""
        cache: dict[tuple, float] = {}
        out = np.empty(len(seqs))
        group_level = self.predictor.group_level
        for i, s in enumerate(seqs):
            key = (
                (s.group_id, s.generated, s.prompt_tokens, s.max_new_tokens)
                if group_level
                else (s.seq_id, s.generated)
            )
            r = cache.get(key)
            if r is None:
                r = (
                    self.predictor.predict_remaining(s)
                    if q is None
                    else self.predictor.remaining_quantile(s, q)
                )
                cache[key] = r = float(r)
            out[i] = r
        return out

    def plan(self, pending, running, kv_budget_tokens, slots) -> list[SeqId]:
        free_slots = slots - len(running)
        if free_slots <= 0 or not pending:
            return []
        run_rem = self._remaining(running)
        run_kv = np.array([s.kv_tokens for s in running], dtype=float)
        run_peak = run_kv + run_rem
        free_kv = kv_budget_tokens - float(run_peak.sum())
        rem = self._remaining(pending)
        peak = np.array([s.kv_tokens for s in pending], dtype=float) + rem
        urgent = np.zeros(len(pending), dtype=bool)
        if self.tail_guard and running:
            urgent = self._urgent(pending, rem, peak, run_rem, run_peak, kv_budget_tokens, slots)
        if urgent.any():
            self.last_mode = "urgent"
            chosen = self._refill(pending, running, rem, peak, run_rem, run_peak, free_kv,
                                  free_slots, urgent)
        elif not running or free_kv >= self.regroup_fraction * kv_budget_tokens:
            self.last_mode = "group"
            chosen = self._group(rem, peak, free_kv, free_slots)
        else:
            self.last_mode = "refill"
            chosen = self._refill(pending, running, rem, peak, run_rem, run_peak, free_kv,
                                  free_slots, urgent)
        if self.admission == "optimistic":
            chosen = self._admit_optimistically(pending, running, rem, run_rem, chosen,
                                                free_slots, kv_budget_tokens)
        if not chosen and not running:
            # nothing is predicted to fit an empty engine: run the smallest alone rather than stall
            chosen = [int(np.argmin(peak))]
        return [pending[i].seq_id for i in chosen]

    def _admit_optimistically(self, pending, running, rem, run_rem, chosen, free_slots,
                              kv_budget) -> list[int]:
        """`chosen` plus the longest SJF-ordered run of the other pending sequences whose
        projected KV peak, with everything running and chosen, fits the budget. Adding a
        sequence never lowers the projected KV at any step, so the longest fitting run is found
        by bisection."""
        room = free_slots - len(chosen)
        if room <= 0:
            return chosen
        taken = set(chosen)
        running_groups = {s.group_id for s in running} | {pending[i].group_id for i in chosen}
        rest = np.array([i for i in range(len(pending)) if i not in taken], dtype=int)
        if rest.size == 0:
            return chosen
        sib = np.array([0 if pending[i].group_id in running_groups else 1 for i in rest])
        # shortest first by the tail quantile: a sample that may run long waits until the
        # projection has room for its growth, whatever its mean
        risk = self._remaining(pending, self.tail_quantile)
        rest = rest[np.lexsort((rest, sib, risk[rest]))][:room]
        base = list(running) + [pending[i] for i in chosen]
        base_rem = np.concatenate([run_rem, rem[chosen]]) if chosen else run_rem

        def fits(k: int) -> bool:
            seqs = base + [pending[i] for i in rest[:k]]
            r = np.concatenate([base_rem, rem[rest[:k]]])
            kv = engine_kv_now(seqs, r, self.block_tokens, self.share_prompts)
            return projected_peak(kv, r, self.admission_horizon) <= kv_budget

        lo, hi = 0, int(rest.size)  # fits(lo) holds (chosen alone is the conservative plan)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid - 1
        return sorted(chosen + rest[:lo].tolist())

    def _urgent(self, pending, rem, peak, run_rem, run_peak, kv_budget, slots) -> np.ndarray:
        """Pending sequences that may finish after the projected end if not started now."""
        # projected lower bound on the steps left, from predicted means (the simulator's bound,
        # plus the reserved-KV x time bound)
        all_rem = np.concatenate([run_rem, rem])
        all_peak = np.concatenate([run_peak, peak])
        horizon = max(
            float(all_rem.max()),
            math.ceil(all_rem.sum() / max(slots, 1)),
            math.ceil(float(all_peak @ all_rem) / max(kv_budget, 1)),
        )
        delta = float(run_rem.min())  # steps until the next admission opportunity
        risk = self._remaining(pending, self.tail_quantile)
        self._risk = risk
        return risk > horizon - delta

    def _group(self, rem, peak, free_kv, free_slots) -> list[int]:
        fits = np.flatnonzero(peak <= free_kv)
        if fits.size == 0:
            return []
        # slots bind first? the top-`free_slots` values that fit together are then optimal
        by_value = fits[np.lexsort((fits, -rem[fits]))][:free_slots]
        if peak[by_value].sum() <= free_kv:
            return sorted(by_value.tolist())
        picked = np.asarray(fptas_knapsack(rem[fits], peak[fits], free_kv, self.eps), dtype=int)
        picked = fits[picked]
        if picked.size > free_slots:  # both constraints bind: keep the most valuable
            picked = picked[np.lexsort((picked, -rem[picked]))][:free_slots]
        return sorted(picked.tolist())

    def _refill(self, pending, running, rem, peak, run_rem, run_peak, free_kv, free_slots,
                urgent) -> list[int]:
        idx = np.arange(len(pending))
        running_groups = {s.group_id for s in running}
        sib = np.array([0 if s.group_id in running_groups else 1 for s in pending])
        # urgent first (highest tail risk first), then SJF on the predicted mean;
        # ties: siblings of running groups (shared prefix), then arrival order
        key = np.where(urgent, -self._risk, rem) if urgent.any() else rem
        order = np.lexsort((idx, sib, key, ~urgent))
        chosen: list[int] = []
        backfill_until = math.inf  # once an urgent one is blocked: only jobs done before it starts
        for i in order.tolist():
            if free_slots <= 0:
                break
            if rem[i] > backfill_until:
                continue
            if peak[i] <= free_kv:
                chosen.append(i)
                free_kv -= peak[i]
                free_slots -= 1
            elif urgent[i] and backfill_until == math.inf:
                backfill_until = self._start_time(peak[i], free_kv, run_rem, run_peak)
        return sorted(chosen)

    @staticmethod
    def _start_time(need_kv: float, free_kv: float, run_rem: np.ndarray, run_peak: np.ndarray):
        """Predicted steps until `need_kv` of reserved KV is free, as running sequences finish."""
        order = np.argsort(run_rem, kind="stable")
        freed = free_kv + np.cumsum(run_peak[order])
        k = int(np.searchsorted(freed, need_kv, side="left"))
        return float(run_rem[order[min(k, order.size - 1)]])
