"""HAPO adaptive temperature processor: exact temperatures on given logits, batch bookkeeping.

Runs the processor class directly with hand-made vLLM BatchUpdates (no engine); the engine
path is covered by tests/test_hapo_rollout.py (slow).
"""

import math

import pytest
import torch

pytest.importorskip("vllm")

from vllm import SamplingParams  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality  # noqa: E402
from vllm.v1.sample.sampler import Sampler  # noqa: E402

from rl.objectives import get_objective  # noqa: E402
from rl.objectives.hapo import adaptive_temperature, entropy_stats  # noqa: E402
from rollout.hapo_temperature import (  # noqa: E402
    EXTRA_ARGS_KEY, HAPOTemperatureProcessor,
)

V = 50


def _params(temperature=1.0, tau=0.05, stats=None, **extra):
    args = {"tau": tau, "stats": stats.to_dict() if stats is not None else None, **extra}
    return SamplingParams(temperature=temperature, extra_args={EXTRA_ARGS_KEY: args})


def _processor(added, removed=(), moved=(), batch_size=None, proc=None):
    proc = proc or HAPOTemperatureProcessor(None, torch.device("cpu"), False)
    update = BatchUpdate(batch_size=batch_size or len(added),
                         removed=list(removed), moved=list(moved),
                         added=[(i, p, [1, 2, 3], []) for i, p in added])
    proc.update_state(update)
    return proc


def _entropy(logits):
    logp = torch.log_softmax(logits.double(), -1)
    return float(-(logp.exp() * logp).sum())


def _logits_with_entropy(target, base):
    """Scale a fixed logit row by 1/s so that its softmax has entropy `target` (bisection)."""
    lo, hi = 1e-3, 1e3  # entropy grows with s
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if _entropy(base / mid) < target:
            lo = mid
        else:
            hi = mid
    return (base / math.sqrt(lo * hi)).float()


def _stats_for(entropies):
    ent = torch.tensor([entropies], dtype=torch.float64)
    return entropy_stats(ent, torch.ones_like(ent, dtype=torch.bool), 0.8)


def test_worked_example_of_algorithms_md():
    # ALGORITHMS.md: entropies [0.1, 0.2, 0.5, 1.0, 2.0], stats from the same batch, T = 1,
    # tau = 0.05 -> ĥ = [-1, -0.69897, -0.30103, 0, 1] -> T_t = 1 + 0.05 ĥ.
    entropies = [0.1, 0.2, 0.5, 1.0, 2.0]
    stats = _stats_for(entropies)
    base = torch.linspace(0, 8, V, dtype=torch.float64)
    z = torch.stack([_logits_with_entropy(h, base) for h in entropies])
    proc = _processor([(i, _params(1.0, 0.05, stats)) for i in range(5)])
    out = proc.apply(z.clone())
    applied = (z / out)[:, 1]  # z / (z / T_t) on a non-zero logit
    expected = torch.tensor([0.95, 0.965052, 0.984949, 1.0, 1.05])
    torch.testing.assert_close(applied, expected, atol=2e-6, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_engine_temperature_combined_gives_adaptive_one(temperature):
    """Processor (before T) then vLLM's own division by T == z / T_t, T_t from adaptive_temperature."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(4, V, generator=gen) * torch.tensor([[0.1], [1.0], [3.0], [8.0]])
    stats = _stats_for([0.05, 0.3, 1.0, 2.5, 3.5])
    proc = _processor([(i, _params(temperature, 0.2, stats)) for i in range(4)])
    assert not proc.is_argmax_invariant()  # runs before Sampler.apply_temperature
    processed = proc.apply(z.clone())
    final = Sampler.apply_temperature(processed, torch.full((4,), temperature), all_random=True)
    t_t = adaptive_temperature(z, stats, temperature, 0.2)
    assert len(set(t_t.tolist())) == 4  # the rows really get different temperatures
    if temperature == 1.0:
        assert torch.equal(final, z / t_t.unsqueeze(1))  # bit-exact at T = 1
    else:
        torch.testing.assert_close(final, z / t_t.unsqueeze(1), rtol=1e-6, atol=1e-6)


def test_first_step_samples_at_base_temperature():
    z = torch.randn(2, V)
    out = _processor([(0, _params(1.0, 0.05, None)), (1, _params(1.0, 0.05, None))]).apply(z.clone())
    assert torch.equal(out, z)


def test_only_hapo_requests_are_scaled_and_greedy_is_left_alone():
    stats = _stats_for([0.1, 1.0, 2.0])
    z = torch.randn(3, V) * 3
    proc = _processor([(0, SamplingParams(temperature=1.0)),  # e.g. the sync canary
                       (1, _params(1.0, 0.5, stats)),
                       (2, _params(0.0, 0.5, stats))])        # greedy: T_t would be 0
    out = proc.apply(z.clone())
    assert torch.equal(out[0], z[0]) and torch.equal(out[2], z[2])
    assert not torch.equal(out[1], z[1])


def test_batch_updates_remove_add_move_swap():
    s1, s2 = _stats_for([0.1, 1.0, 2.0]), _stats_for([0.5, 0.6, 0.7])
    proc = _processor([(0, _params(1.0, 0.1, s1)), (1, _params(1.0, 0.2, s2)),
                       (2, SamplingParams(temperature=1.0))])
    a, b = proc.requests[0], proc.requests[1]
    _processor([], moved=[(0, 2, MoveDirectionality.SWAP)], batch_size=3, proc=proc)
    assert proc.requests == {2: a, 1: b}
    _processor([], moved=[(1, 0, MoveDirectionality.UNIDIRECTIONAL)], batch_size=3, proc=proc)
    assert proc.requests == {2: a, 0: b}
    # a plain request added at a HAPO request's index replaces it
    _processor([(2, SamplingParams(temperature=1.0))], removed=[0], batch_size=3, proc=proc)
    assert proc.requests == {}


def test_metrics_are_means_of_applied_temperatures():
    stats = _stats_for([0.05, 0.3, 1.0, 2.5, 3.5])
    z = torch.randn(3, V) * torch.tensor([[0.2], [2.0], [6.0]])
    proc = _processor([(i, _params(1.0, 0.3, stats)) for i in range(3)])
    proc.apply(z.clone())
    t_t = adaptive_temperature(z, stats, 1.0, 0.3).double()
    m = proc.pop_metrics()
    assert m["hapo/temperature_mean"] == pytest.approx(float(t_t.mean()))
    assert m["hapo/temperature_min"] == pytest.approx(float(t_t.min()))
    assert m["hapo/rollout_h_hat_mean"] == pytest.approx(float(((t_t - 1) / 0.3).mean()))
    assert m["hapo/rollout_rows"] == 3
    assert proc.pop_metrics() == {}  # reset after reading


def test_validate_params():
    HAPOTemperatureProcessor.validate_params(SamplingParams())  # no HAPO args: fine
    HAPOTemperatureProcessor.validate_params(_params(1.0, 0.05, _stats_for([0.1, 1.0])))
    with pytest.raises(ValueError, match="tau"):
        HAPOTemperatureProcessor.validate_params(_params(1.0, 1.5))
    with pytest.raises(TypeError):
        HAPOTemperatureProcessor.validate_params(
            SamplingParams(extra_args={EXTRA_ARGS_KEY: {"tau": 0.1, "stats": {"pivot": 0.0}}}))


def test_objective_points_at_this_processor_with_args_it_accepts():
    import importlib

    obj = get_objective("hapo", tau=0.1)
    module, name = obj.rollout_logits_processor.split(":")
    assert getattr(importlib.import_module(module), name) is HAPOTemperatureProcessor
    stats = _stats_for([0.1, 0.4, 2.0])
    params = SamplingParams(temperature=1.0, extra_args=obj.rollout_sampling_args(stats))
    HAPOTemperatureProcessor.validate_params(params)
    proc = _processor([(0, params)])
    assert proc.requests[0].stats == stats and proc.requests[0].tau == 0.1
    assert get_objective("grpo").rollout_logits_processor is None  # the declared default: no processor
