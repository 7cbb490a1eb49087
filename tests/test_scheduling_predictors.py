"""Length predictors: interface contract, conditional revision, online learning."""

import math

import numpy as np
import pytest

from scheduling.predictors import (
    ConstantPredictor,
    OracleLengthPredictor,
    TokenConditionedPredictor,
    lognormal_clipped_mean,
    make_predictor,
)
from scheduling.traces import synthetic_trace
from scheduling.types import Seq


def test_lognormal_clipped_mean_against_monte_carlo():
    rng = np.random.default_rng(0)
    mu, sigma, cap = math.log(100), 0.9, 400.0
    x = np.exp(rng.normal(mu, sigma, 2_000_000))
    for g in (0.0, 50.0, 150.0, 350.0):
        alive = x[x > g]
        mc = np.minimum(alive, cap).mean()
        assert lognormal_clipped_mean(mu, sigma, g, cap) == pytest.approx(mc, rel=0.01)
    assert lognormal_clipped_mean(mu, sigma, 400.0, cap) == cap


def test_remaining_is_revised_upward_and_never_below_one():
    p = TokenConditionedPredictor()
    s = Seq(0, 0, 50, max_new_tokens=512, prompt_ids=tuple(range(50)))
    total0 = p.predict(s)
    assert 1.0 <= total0 <= 512
    totals = []
    for g in (0, 10, 100, 300, 511):
        s.generated = g
        rem = p.predict_remaining(s)
        assert rem >= 1.0
        assert g + rem <= 512 + 1e-9
        totals.append(g + rem)
    # having survived longer, the expected total only grows
    assert all(b >= a - 1e-9 for a, b in zip(totals, totals[1:]))
    assert totals[-2] > totals[0]


def test_oracle_and_constant():
    s = Seq("a", 0, 10, 100)
    o = OracleLengthPredictor({"a": 30})
    assert o.predict(s) == 30
    s.generated = 29
    assert o.predict_remaining(s) == 1
    s.generated = 30
    assert o.predict_remaining(s) == 1  # never below 1
    with pytest.raises(KeyError):
        o.predict(Seq("b", 0, 10, 100))
    c = ConstantPredictor()
    assert c.predict(Seq(0, 0, 5, 100)) == 50
    assert c.predict_remaining(Seq(0, 0, 5, 100, generated=20)) == 30
    assert c.predict_remaining(Seq(0, 0, 5, 100, generated=80)) == 10  # overran: halfway to cap


def test_factory():
    assert isinstance(make_predictor("token_conditioned", n_hash=16), TokenConditionedPredictor)
    assert isinstance(make_predictor("oracle", lengths={1: 3}), OracleLengthPredictor)
    assert isinstance(make_predictor("constant"), ConstantPredictor)
    with pytest.raises(ValueError, match="constant, egtp, oracle, token_conditioned"):
        make_predictor("hidden_state")


def _log_error(pred, trace):
    """Mean |log predicted - log true| over the trace, without group evidence."""
    pred.begin_rollout()
    errs = [abs(math.log(pred.predict(s)) - math.log(n)) for s, n in zip(trace.to_seqs(), trace.lengths)]
    return float(np.mean(errs))


def test_predictor_learns_from_prompt_tokens():
    """Held-out prompts from the same world: error drops after observing earlier rollouts, and
    ends clearly below the best constant guess (the median of the training lengths)."""
    kw = dict(kind="lognormal", prompts=48, group_size=8, max_new_tokens=1024)
    held_out = synthetic_trace(seed=99, **kw)
    p = TokenConditionedPredictor()
    before = _log_error(p, held_out)
    train_lengths = []
    for step in range(6):
        tr = synthetic_trace(seed=step, **kw)
        p.begin_rollout()
        for s, n in zip(tr.to_seqs(), tr.lengths):
            p.observe(s, n)
        train_lengths += tr.lengths
    after = _log_error(p, held_out)
    const = float(np.mean(np.abs(np.log(np.median(train_lengths)) - np.log(held_out.lengths))))
    assert after < 0.7 * before
    assert after < 0.9 * const


def test_group_evidence_sharpens_predictions():
    """Within a step, finished siblings pull the prediction of the rest toward their lengths."""
    p = TokenConditionedPredictor()
    tr = synthetic_trace("lognormal", prompts=40, group_size=8, max_new_tokens=1024, seed=3)
    seqs, lengths = tr.to_seqs(), tr.lengths
    for s, n in zip(seqs[:160], lengths[:160]):  # learn from the first 20 prompts
        p.observe(s, n)
    p.begin_rollout()
    cold, warm = [], []
    for b in range(20, 40):
        grp = [(s, n) for s, n in zip(seqs, lengths) if s.group_id == b]
        true_med = math.log(np.median([n for _, n in grp]))
        cold.append(abs(math.log(p.predict(grp[0][0])) - true_med))
        for s, n in grp[:4]:
            p.observe(s, n)
        warm.append(abs(math.log(p.predict(grp[-1][0])) - true_med))
    assert np.mean(warm) < 0.8 * np.mean(cold)


def test_remaining_quantile_matches_monte_carlo():
    p = TokenConditionedPredictor()
    s = Seq(0, 0, 40, max_new_tokens=2048, prompt_ids=tuple(range(40)), generated=100)
    mu, sigma = p._log_params(s)
    rng = np.random.default_rng(1)
    x = np.exp(rng.normal(mu, sigma, 2_000_000))
    alive = np.minimum(x[x > 100], 2048) - 100
    for q in (0.5, 0.9):
        assert p.remaining_quantile(s, q) == pytest.approx(np.quantile(alive, q), rel=0.02)
    assert p.remaining_quantile(s, 0.99) > p.remaining_quantile(s, 0.9) > p.remaining_quantile(s, 0.5)


def test_scheduling_imports_no_heavy_frameworks():
    import subprocess
    import sys

    code = (
        "import sys, pkgutil, importlib, scheduling;"
        "[importlib.import_module(m.name) for m in pkgutil.iter_modules(scheduling.__path__, 'scheduling.')];"
        "bad = [m for m in ('torch', 'ray', 'vllm') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
