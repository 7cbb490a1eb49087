"""Every worked number of ALGORITHMS.md, with the arithmetic in comments."""

import math

import pytest
import torch

from rl.objectives import (
    LossNorm, adaptive_temperature, aggregate, clipped_pg, entropy_score, entropy_stats,
    fgo_weights, filter_groups, get_objective, kl_penalty, overlong_penalty,
)
from rl.objectives.hapo import hapo_token_loss

D = torch.float64
TOL = 1e-6  # the spec prints 6 decimals


def t(x, dtype=D):
    return torch.tensor(x, dtype=dtype)


def one_group(n):
    return torch.zeros(n, dtype=torch.long)


def full_mask(n, T):
    return torch.ones(n, T, dtype=torch.bool)


def lengths_mask(lengths, T=None):
    T = T or max(lengths)
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]


# ------------------------------------------------------------------ shared pieces

def test_aggregation_example():
    # a: [1, 1], b: [0, 0, 0, 0], T = C = 4
    loss = t([[1, 1, 0, 0], [0, 0, 0, 0]])
    mask = lengths_mask([2, 4])
    # token-mean 2/6; seq-mean-token-mean (2/2 + 0/4)/2; seq-mean-token-sum (2 + 0)/2; norm 2/(2*4)
    expected = {"token-mean": 1 / 3, "seq-mean-token-mean": 0.5,
                "seq-mean-token-sum": 1.0, "seq-mean-token-sum-norm": 0.25}
    for mode, want in expected.items():
        assert aggregate(loss, mask, mode).item() == pytest.approx(want, abs=1e-12), mode
    # C given explicitly (configured max length 8): 2 / (2*8)
    norm = LossNorm.from_mask(mask, max_len=8)
    assert aggregate(loss, mask, "seq-mean-token-sum-norm", norm).item() == pytest.approx(0.125, abs=1e-12)


def test_kl_estimators_example_and_clamps():
    lp, ref = t([-1.0]), t([-1.5])
    # d = ref - lp = -0.5: k3 = e^-0.5 + 0.5 - 1 = 0.6065307 - 0.5 = 0.106531
    assert kl_penalty(lp, ref, "k3").item() == pytest.approx(0.106531, abs=TOL)
    assert kl_penalty(lp, ref, "k1").item() == pytest.approx(0.5, abs=1e-12)   # lp - ref
    assert kl_penalty(lp, ref, "k2").item() == pytest.approx(0.125, abs=1e-12)  # 0.5 * 0.5^2
    # d = 100 is clamped to 20, e^20 - 21 is clamped to 10; d = -100 -> -20: e^-20 + 19 -> 10
    assert kl_penalty(t([0.0]), t([100.0]), "k3").item() == 10.0
    assert kl_penalty(t([0.0]), t([-100.0]), "k3").item() == 10.0


def test_ppo_clip_and_dual_clip():
    ratio = t([math.exp(0.2)])  # lp=-1.0, old=-1.2 -> ratio 1.221403
    pg, flags = clipped_pg(ratio, t([1.0]), 0.2, 0.2)
    assert pg.item() == pytest.approx(-1.2, abs=1e-12) and flags["high"].item()
    pg, flags = clipped_pg(ratio, t([1.0]), 0.2, 0.28)
    assert pg.item() == pytest.approx(-1.221403, abs=TOL) and not flags["high"].item()
    # A = -1, ratio 5: plain PPO max(5, 1.2) = 5; dual clip c=3 caps it at 3
    pg, flags = clipped_pg(t([5.0]), t([-1.0]), 0.2, 0.2, dual_clip_c=3.0)
    assert pg.item() == 3.0 and flags["dual"].item()


# ------------------------------------------------------------------ GRPO / Dr. GRPO / DAPO

def test_grpo_advantages_example():
    r, g, m = t([1, 0, 0, 1]), one_group(4), full_mask(4, 3)
    # mean 0.5; Bessel std sqrt(4*0.25/3) = 0.577350 -> 0.5/0.577351 = 0.866024
    adv = get_objective("grpo").advantages(r, g, m)
    assert torch.allclose(adv, t([0.866024, -0.866024, -0.866024, 0.866024])[:, None].expand(4, 3), atol=TOL)
    # population std 0.5 -> +-1 (up to the 1e-6 in the denominator)
    adv = get_objective("grpo", std_unbiased=False).advantages(r, g, m)
    assert torch.allclose(adv[:, 0], t([1.0, -1.0, -1.0, 1.0]), atol=1e-5)
    # all equal -> exactly 0 (0.1 is not representable: the mean is off by an ulp)
    adv = get_objective("grpo").advantages(t([0.1, 0.1, 0.1]), one_group(3), full_mask(3, 2))
    assert torch.equal(adv, torch.zeros(3, 2, dtype=D))


def test_grpo_loss_example():
    lp, old, a, m = t([[-1.0]]), t([[-1.2]]), t([[1.0]]), full_mask(1, 1)
    # ratio e^0.2 = 1.221403 > 1.2 -> clipped: -1.2
    loss, met = get_objective("grpo").loss(lp, old, a, m)
    assert loss.item() == pytest.approx(-1.2, abs=1e-12) and met["clip_ratio"] == 1.0
    loss, met = get_objective("grpo", eps_high=0.28).loss(lp, old, a, m)
    assert loss.item() == pytest.approx(-1.221403, abs=TOL) and met["clip_ratio"] == 0.0
    # DAPO's defaults are the clip-higher ones
    loss, _ = get_objective("dapo").loss(lp, old, a, m)
    assert loss.item() == pytest.approx(-1.221403, abs=TOL)


def test_dr_grpo_advantages_example():
    adv = get_objective("dr_grpo").advantages(t([1, 0, 0, 1]), one_group(4), full_mask(4, 2))
    assert torch.allclose(adv[:, 0], t([0.5, -0.5, -0.5, 0.5]), atol=1e-12)
    assert get_objective("dr_grpo").cfg.loss_agg_mode == "seq-mean-token-sum-norm"


def test_dapo_overlong_example():
    # E = 20480 - 4096 = 16384: 16000, 16384 -> 0; 18432 -> (16384-18432)/4096 = -0.5; 20480 -> -1
    pen = overlong_penalty(torch.tensor([16000, 16384, 18432, 20480, 30000]), 20480, 4096)
    assert torch.allclose(pen.double(), t([0.0, 0.0, -0.5, -1.0, -1.0]), atol=1e-12)
    obj = get_objective("dapo", max_response_len=20480)
    shaped = obj.shape_rewards(t([1.0, 1.0]), torch.tensor([16000, 18432]))
    assert torch.allclose(shaped, t([1.0, 0.5]), atol=1e-12)


def test_dapo_filter_groups():
    r = t([1, 1, 0, 1, 0, 0, 1])
    g = torch.tensor([7, 7, 3, 3, 5, 5, 9])  # 7 all equal, 3 mixed, 5 all equal, 9 singleton
    keep = filter_groups(r, g)
    assert keep.tolist() == [False, False, True, True, False, False, False]
    assert get_objective("dapo", filter_groups=False).keep_groups(r, g).all()


# ------------------------------------------------------------------ GSPO

def test_gspo_example():
    obj = get_objective("gspo")
    old = t([[-1.0, -1.0, -1.0]])
    m = full_mask(1, 3)
    # mean log ratio (0.1 - 0.2 + 0.4)/3 = 0.1 -> s = e^0.1 = 1.105171
    lp = (old + t([[0.1, -0.2, 0.4]])).requires_grad_()
    loss, met = obj.loss(lp, old, t([[1.0, 1.0, 1.0]]), m)
    # A=+1: s > 1 + 4e-4 -> clipped to -1.0004 on every token, no gradient
    assert loss.item() == pytest.approx(-1.0004, abs=1e-12)
    assert met["ratio/mean"] == pytest.approx(1.105171, abs=TOL) and met["clip_ratio"] == 1.0
    loss.backward()
    assert torch.equal(lp.grad, torch.zeros_like(lp))
    lp.grad = None
    loss, _ = obj.loss(lp, old, t([[-1.0, -1.0, -1.0]]), m)
    # A=-1: max(s, 1.0004) = s = 1.105171; d/d lp_t = s / L (token form, seq-mean-token-mean)
    assert loss.item() == pytest.approx(1.105171, abs=TOL)
    loss.backward()
    assert torch.allclose(lp.grad, torch.full((1, 3), math.exp(0.1) / 3, dtype=D), atol=1e-12)


# ------------------------------------------------------------------ FGO

def test_fgo_weights_example():
    L, H, g = t([100, 200, 300, 100]), t([10, 20, 30, 10]), one_group(4)
    # G+: mean L 150, mean H 15: raw = 1.5^0.01*1.5 = 1.506095, 0.75^0.01*0.75 = 0.747845
    #     softmax -> 1/(1+e^-0.758250) = 0.680973
    # G-: mean L 200, mean H 20: raw = 1.5^0.01*(2/3) = 0.669375, 0.5^0.01*2 = 1.986185
    #     softmax -> 1/(1+e^1.316810) = 0.211350
    w = fgo_weights(torch.tensor([True, True, False, False]), L, H, g, 0.01, 1.0)
    assert torch.allclose(w, t([0.680973, 0.319027, 0.211350, 0.788650]), atol=TOL)
    # all correct: mean L 175, mean H 17.5: raw 1.759821, 0.873833, 0.580198, 1.759821
    w = fgo_weights(torch.ones(4, dtype=torch.bool), L, H, g, 0.01, 1.0)
    assert torch.allclose(w, t([0.367687, 0.151600, 0.113025, 0.367687]), atol=TOL)


def _logp_with_token_entropy(v):
    """lp < -1 with -exp(lp)*lp = v (monotone there): bisection."""
    lo, hi = -30.0, -1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if -math.exp(mid) * mid > v:
            hi = mid
        else:
            lo = mid
    return (lo + hi) / 2


def test_fgo_advantages_example():
    # H_i / L_i = 0.1 for every response, so one per-token value gives H = [10, 20, 30, 10]
    lengths = [100, 200, 300, 100]
    mask = lengths_mask(lengths)
    logp = torch.full(mask.shape, _logp_with_token_entropy(0.1), dtype=D)
    obj = get_objective("fgo")
    # mean of R = W*r is (0.680973 + 0.319027 - 0.211350 - 0.788650)/4 = 0 -> A = R
    adv = obj.advantages(t([1, 1, 0, 0]), one_group(4), mask, logp=logp)
    assert torch.allclose(adv[:, 0], t([0.680973, 0.319027, -0.211350, -0.788650]), atol=TOL)
    assert torch.equal(adv == 0, ~mask)
    # all correct: R = W, A = R - 0.25
    adv = obj.advantages(t([1, 1, 1, 1]), one_group(4), mask, logp=logp)
    assert torch.allclose(adv[:, 0], t([0.117687, -0.098400, -0.136975, 0.117687]), atol=TOL)
    assert obj.last_advantage_metrics["fgo/weight_max"] == pytest.approx(0.367687, abs=TOL)


# ------------------------------------------------------------------ HAPO

ENTS = [0.1, 0.2, 0.5, 1.0, 2.0]


def test_hapo_entropy_score_example():
    e = t([ENTS])
    m = full_mask(1, 5)
    # x = log e; pivot rank round(0.8*4) = 3 -> m = log 1 = 0; scale cancels in ĥ:
    # ĥ = log(e)/log 2 for e > 1, log(e)/|log 0.1| = log10(e) for e <= 1
    h = entropy_score(e, entropy_stats(e, m, 0.8))
    assert torch.allclose(h, t([[-1.0, -0.698970, -0.301030, 0.0, 1.0]]), atol=TOL)
    # reference-code sign slip: h <= 0 divided by min(h) < 0 -> ĥ >= 0
    h = entropy_score(e, entropy_stats(e, m, 0.8, code_compat=True))
    assert torch.allclose(h, t([[1.0, 0.698970, 0.301030, 0.0, 1.0]]), atol=TOL)
    st = get_objective("hapo").batch_stats(m, e)
    assert st.pivot == 0.0 and type(st).from_dict(st.to_dict()) == st


def _logits_with_entropy(target, V=16):
    """Row of logits z/τ with softmax entropy ``target`` (entropy increases with τ)."""
    z = torch.arange(V, dtype=D)
    lo, hi = 1e-3, 1e3
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        p = torch.softmax(z / mid, -1)
        if -(p * p.log()).sum().item() > target:
            hi = mid
        else:
            lo = mid
    return z / math.sqrt(lo * hi)


def test_hapo_adaptive_temperature_example():
    e = t([ENTS])
    stats = entropy_stats(e, full_mask(1, 5), 0.8)
    logits = torch.stack([_logits_with_entropy(v) for v in ENTS])
    # T_t = 1 * (1 + 0.05 * ĥ): [0.95, 0.965052, 0.984949, 1.0, 1.05]
    temps = adaptive_temperature(logits, stats, 1.0, 0.05)
    assert torch.allclose(temps.double(), t([0.95, 0.965052, 0.984949, 1.0, 1.05]), atol=1e-5)
    obj_temps = get_objective("hapo", tau=0.1).temperatures(logits, stats, 1.0)  # tau from config
    assert torch.allclose(obj_temps.double(), t([0.9, 0.930103, 0.969897, 1.0, 1.1]), atol=1e-5)
    # the stats recover the batch's log-entropy range: x in [log 0.1, log 2]
    assert stats.x_min == pytest.approx(math.log(0.1), abs=1e-12)
    assert stats.x_max == pytest.approx(math.log(2.0), abs=1e-12)
    # first step (no stats) samples at T; an entropy beyond the batch max is clamped to ĥ = 1
    assert torch.equal(adaptive_temperature(logits, None, 0.7), torch.full((5,), 0.7))
    hot = _logits_with_entropy(2.7)[None]
    assert adaptive_temperature(hot, stats, 2.0, 0.05).item() == pytest.approx(2.1, abs=1e-6)


def test_hapo_advantage_example():
    # tokens: 2+6 carry 1, 2+2 carry 0: mu = 8/12, sd = sqrt(2/3 * 1/3) = 0.471405
    # A = (1/3)/0.471405 = 0.707107, (-2/3)/0.471405 = -1.414214
    mask = lengths_mask([2, 2, 2, 6])
    adv = get_objective("hapo").advantages(t([1, 0, 0, 1]), one_group(4), mask)
    assert torch.allclose(adv[:, 0], t([0.707107, -1.414214, -1.414214, 0.707107]), atol=TOL)
    assert torch.equal(adv == 0, ~mask)


def test_hapo_advantage_fallback():
    # one correct response of 1 token among 30 wrong ones of 100 tokens: token-level
    # mu = 1/3001, sd ~ 0.018, A_correct ~ 54.8 >= 5 -> the group uses the GRPO advantage
    lengths = [1] + [100] * 30
    mask = lengths_mask(lengths)
    r = t([1.0] + [0.0] * 30)
    obj = get_objective("hapo")
    adv = obj.advantages(r, one_group(31), mask)
    grpo = get_objective("grpo").advantages(r, one_group(31), mask)
    assert torch.allclose(adv, grpo, atol=1e-12)
    assert obj.last_advantage_metrics["hapo/fallback_group_frac"] == 1.0


def test_hapo_loss_examples():
    def one(h, a, ratio):
        pg, _, _ = hapo_token_loss(t([ratio]), t([a]), t([h]), 0.2, 0.2, 1.0, 1.0, 10.0)
        return pg.item()
    # ĥ=0.5: ch = 0.2*1.5 = 0.3, zone (0.9, 1.15) -> 1.2 outside -> A_ent = 1.5;
    # max(-1.5*1.2, -1.5*clip(1.2, 0.8, 1.3)) = -1.8
    assert one(0.5, 1.0, 1.2) == pytest.approx(-1.8, abs=1e-12)
    # ĥ=-0.5: cl = 0.3, zone (0.85, 1.1) -> 1.0 inside -> A_ent = 0.5 -> -0.5
    assert one(-0.5, 1.0, 1.0) == pytest.approx(-0.5, abs=1e-12)
    # ĥ=-0.5, A=-1, ratio 0.75: floor 0.7, outside the zone -> A = -1: max(0.75, 0.75) = 0.75
    assert one(-0.5, -1.0, 0.75) == pytest.approx(0.75, abs=1e-12)
    plain, _ = clipped_pg(t([0.75]), t([-1.0]), 0.2, 0.2)  # max(0.75, 0.8) = 0.8
    assert plain.item() == pytest.approx(0.8, abs=1e-12)


# ------------------------------------------------------------------ DHPO

def test_dhpo_example():
    old = t([[-2.0, -2.0]])
    lp = old + t([[math.log(1.3), math.log(0.9)]])
    # s = sqrt(1.3*0.9) = 1.081665; token 1: R = (1.3 + 1.081665)/2 = 1.190833,
    # Rc = 0.5*1.28 + 0.5*1.0004 = 1.1402 -> -1.1402; token 2: R = 0.990833,
    # Rc = 0.5*0.9 + 0.5*1.0004 = 0.9502 -> -0.9502; token-mean -1.0452
    loss, met = get_objective("dhpo").loss(lp, old, t([[1.0, 1.0]]), full_mask(1, 2))
    assert loss.item() == pytest.approx(-1.0452, abs=1e-12)
    assert met["ratio/mean"] == pytest.approx((1.190833 + 0.990833) / 2, abs=TOL)
    assert met["dhpo/mix_weight_mean"] == 0.5 and met["clip_ratio"] == 1.0
    # entropy mixing: ent [2, 1] -> w = [1, 0.5]: token 1 pure token branch 1.28, token 2 as above
    obj = get_objective("dhpo", mixing="entropy")
    loss, met = obj.loss(lp, old, t([[1.0, 1.0]]), full_mask(1, 2), entropy=t([[2.0, 1.0]]))
    assert loss.item() == pytest.approx(-(1.28 + 0.9502) / 2, abs=1e-12)
    assert met["dhpo/mix_weight_mean"] == 0.75
