"""HAPO adaptive temperature sampling inside vLLM: a V1 logits processor.

HAPO ("Heterogeneous Adaptive Policy Optimization: Tailoring Optimization to Every Token's
Nature") samples each token at T_t = T * (1 + tau * ĥ_t): ĥ_t in [-1, 1] is the entropy of the
raw next-token distribution, scored with the pivot/scale statistics (``EntropyStats``) of the
previous training step. Confident positions are sampled cooler, forking positions hotter.
The formula lives in ``rl.objectives.hapo.adaptive_temperature``; this module only applies it.

How it composes with the engine's own temperature (vLLM 0.32, ``v1/sample/sampler.py``):
``Sampler.forward`` casts the logits to float32, runs the NON-argmax-invariant logits
processors, then the penalties, and only then ``Sampler.sample`` divides each row by the
request's temperature T (argmax-invariant processors such as min-p run after that division).
This processor therefore declares itself non-argmax-invariant so that it sees the raw logits
z, and divides row b by T_t / T; the engine's division by T then leaves z / T_t. With T = 1
(the default) the ratio is T_t itself and the result is bit-identical to z / T_t.
The rollout worker asks vLLM for ``logprobs_mode=processed_logprobs``: the sampled tokens'
log-probs are those of z / T_t, the behavior policy that the learner's off-policy correction
weighs against its own log-probs at T (docs/ALGORITHMS.md, HAPO: the importance ratio uses the
global T). The entropy scored here is that of the raw z, the same the learner's statistics
are computed from (``logits_entropy``; tests/test_hapo_consistency.py).

Per-request parameters travel in ``SamplingParams.extra_args[EXTRA_ARGS_KEY]``:
``{"tau": float, "stats": EntropyStats.to_dict() or None, "record": bool (tests)}``. They are
request-scoped, so a rollout and the weight sync that follows it cannot disagree about which
statistics were used; requests without the key (the sync canary) are left untouched, and
``stats: None`` (the first training step) samples at T.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from rl.objectives.hapo import EntropyStats, adaptive_temperature

EXTRA_ARGS_KEY = "hapo_temperature"
_GREEDY_EPS = 1e-5  # vLLM treats T below this as greedy; greedy rows are left alone
MAX_RECORDED_ROWS = 512  # "record" keeps raw logits rows for tests; bounded memory


@dataclass(frozen=True)
class _RequestState:
    base_temperature: float
    tau: float
    stats: Optional[EntropyStats]
    record: bool


def _parse(params: SamplingParams) -> Optional[_RequestState]:
    """The request's HAPO state, or None when it does not ask for adaptive temperature."""
    args = (params.extra_args or {}).get(EXTRA_ARGS_KEY)
    if args is None or params.temperature < _GREEDY_EPS:
        return None
    stats = args.get("stats")
    return _RequestState(float(params.temperature), float(args.get("tau", 0.05)),
                         EntropyStats.from_dict(stats) if stats is not None else None,
                         bool(args.get("record", False)))


class HAPOTemperatureProcessor(LogitsProcessor):
    """Divides each HAPO request's logits row by T_t / T (see the module docstring).

    State: persistent-batch index -> ``_RequestState``, kept in step with vLLM's batch updates
    (removed, then added, then moved). Metrics since the last ``pop_metrics`` cover every
    logits row it scaled: mean/min/max T_t and mean ĥ_t = (T_t / T - 1) / tau.
    """

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.requests: dict[int, _RequestState] = {}
        self.recorded: list[tuple[torch.Tensor, float, float]] = []
        self._reset_metrics()

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        args = (sampling_params.extra_args or {}).get(EXTRA_ARGS_KEY)
        if args is None:
            return
        if not isinstance(args, dict):
            raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}] must be a dict, got {args!r}")
        tau = args.get("tau", 0.05)
        if not (isinstance(tau, (int, float)) and 0 <= tau < 1):
            # T_t = T(1 + tau*ĥ) with ĥ = -1 must stay positive
            raise ValueError(f"hapo tau must be in [0, 1), got {tau!r}")
        if args.get("stats") is not None:
            EntropyStats.from_dict(args["stats"])  # TypeError on missing / unknown fields

    def is_argmax_invariant(self) -> bool:
        # Mathematically it is (a positive rescaling), but vLLM runs argmax-invariant
        # processors AFTER dividing by T; this one must see the raw logits (module docstring).
        return False

    def update_state(self, batch_update: Optional[BatchUpdate]) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.requests.pop(index, None)
        for index, params, _, _ in batch_update.added:
            state = _parse(params)
            if state is None:
                self.requests.pop(index, None)  # a new request may reuse a HAPO one's index
            else:
                self.requests[index] = state
        for a, b, direction in batch_update.moved:
            state_a, state_b = self.requests.pop(a, None), self.requests.pop(b, None)
            if state_a is not None:
                self.requests[b] = state_a
            if state_b is not None and direction == MoveDirectionality.SWAP:
                self.requests[a] = state_b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] float32, row b = persistent-batch index b; scaled in place."""
        if not self.requests:
            return logits
        # Rows sharing (T, tau, stats) -- in practice all of a rollout -- go through one call.
        groups: dict[tuple, list[int]] = {}
        for index, s in self.requests.items():
            if index < logits.shape[0]:
                groups.setdefault((s.base_temperature, s.tau, s.stats, s.record), []).append(index)
        for (base_t, tau, stats, record), rows in groups.items():
            idx = torch.tensor(sorted(rows), device=logits.device)
            raw = logits.index_select(0, idx)
            temps = adaptive_temperature(raw, stats, base_t, tau).to(logits.dtype)  # [b]
            logits.index_copy_(0, idx, raw / (temps / base_t).unsqueeze(1))
            self._accumulate(temps, base_t, tau)
            if record:
                for row, t in zip(raw, temps.tolist()):
                    if len(self.recorded) < MAX_RECORDED_ROWS:
                        self.recorded.append((row.clone().cpu(), base_t, t))
        return logits

    # --- metrics ----------------------------------------------------------------------

    def _reset_metrics(self) -> None:
        self._rows = 0
        self._t_sum = self._h_sum = 0.0
        self._t_min, self._t_max = float("inf"), float("-inf")

    def _accumulate(self, temps: torch.Tensor, base_t: float, tau: float) -> None:
        t = temps.double()
        self._rows += t.numel()
        self._t_sum += float(t.sum())
        if tau > 0:
            self._h_sum += float(((t / base_t - 1.0) / tau).sum())
        self._t_min = min(self._t_min, float(t.min()))
        self._t_max = max(self._t_max, float(t.max()))

    def pop_metrics(self) -> dict[str, float]:
        """Metrics over the rows scaled since the last call, then reset ({} if none)."""
        if not self._rows:
            return {}
        n = self._rows
        out = {"hapo/temperature_mean": self._t_sum / n, "hapo/temperature_min": self._t_min,
               "hapo/temperature_max": self._t_max, "hapo/rollout_h_hat_mean": self._h_sum / n,
               "hapo/rollout_rows": float(n)}
        self._reset_metrics()
        return out


# --- collective_rpc targets (run inside the vLLM worker, which owns the processors) -------

def _custom_processors(worker: Any) -> list:
    return list(worker.model_runner.input_batch.logitsprocs.all)


def pop_processor_metrics(worker: Any) -> dict[str, float]:
    """Merged ``pop_metrics()`` of the engine's logits processors that have one."""
    out: dict[str, float] = {}
    for proc in _custom_processors(worker):
        if hasattr(proc, "pop_metrics"):
            out.update(proc.pop_metrics())
    return out


def pop_recorded_rows(worker: Any) -> list[tuple[torch.Tensor, float, float]]:
    """(raw logits [V], T, applied T_t) of the rows scaled for requests with ``record: True``."""
    rows: list = []
    for proc in _custom_processors(worker):
        if isinstance(proc, HAPOTemperatureProcessor):
            rows.extend(proc.recorded)
            proc.recorded = []
    return rows


__all__ = ["HAPOTemperatureProcessor", "EXTRA_ARGS_KEY", "pop_processor_metrics", "pop_recorded_rows"]
