"""Vectorized advantages and losses against plain Python loops on random inputs (float64)."""

import math

import pytest
import torch

from rl.objectives import get_objective, objective_defaults

D = torch.float64
SEEDS = [0, 1, 2, 3]


def make_batch(seed, T=7):
    """Random batch: 4 groups of sizes 4, 3, 1, 2 with shuffled non-contiguous ids."""
    g = torch.Generator().manual_seed(seed)
    group = torch.tensor([5] * 4 + [2] * 3 + [8] + [0] * 2)
    perm = torch.randperm(len(group), generator=g)
    group = group[perm]
    N = len(group)
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    if seed % 2:
        rewards = torch.randint(0, 2, (N,), generator=g).to(D)
    else:
        rewards = torch.rand(N, generator=g, dtype=D)
    old = -3 * torch.rand(N, T, generator=g, dtype=D) - 0.05
    scale = torch.tensor([1e-4, 0.05, 0.3], dtype=D)[torch.randint(0, 3, (N, 1), generator=g)]
    logp = old + scale * torch.randn(N, T, generator=g, dtype=D)
    adv = torch.randn(N, T, generator=g, dtype=D)
    ref = logp + 0.3 * torch.randn(N, T, generator=g, dtype=D)
    ent = 3 * torch.rand(N, T, generator=g, dtype=D) + 0.01
    return dict(rewards=rewards, group=group, mask=mask, old=old, logp=logp, adv=adv, ref=ref, ent=ent)


def rows(mask, x):
    """Valid values of each row as Python lists."""
    return [[float(v) for v, m in zip(xr, mr) if m] for xr, mr in zip(x.tolist(), mask.tolist())]


def groups_of(group):
    out = {}
    for i, gid in enumerate(group.tolist()):
        out.setdefault(gid, []).append(i)
    return out


# ------------------------------------------------------------------ advantage references

def ref_grpo_scores(r, group, norm_by_std=True, unbiased=True):
    score = [0.0] * len(r)
    for idx in groups_of(group).values():
        vals = [r[i] for i in idx]
        n = len(vals)
        if n < 2 or max(vals) == min(vals):
            continue
        mean = sum(vals) / n
        var = sum((v - mean) ** 2 for v in vals) / ((n - 1) if unbiased else n)
        for i in idx:
            score[i] = (r[i] - mean) / (math.sqrt(var) + 1e-6) if norm_by_std else r[i] - mean
    return score


def ref_fgo_scores(r, group, lp_rows, thr, alpha, beta, norm_by_std, unbiased):
    L = [len(x) for x in lp_rows]
    H = [-sum(math.exp(v) * v for v in x) for x in lp_rows]
    R = [0.0] * len(r)
    for idx in groups_of(group).values():
        for correct in (True, False):
            sub = [i for i in idx if (r[i] > thr) == correct]
            if not sub:
                continue
            mL = sum(L[i] for i in sub) / len(sub)
            mH = sum(H[i] for i in sub) / len(sub)
            raw = {}
            for i in sub:
                lt = (mL / (L[i] + 1e-6)) if correct else (L[i] / (mL + 1e-6))
                raw[i] = lt ** alpha * (mH / (H[i] + 1e-6)) ** beta
            z = sum(math.exp(v) for v in raw.values())
            for i in sub:
                R[i] = math.exp(raw[i]) / z * (1.0 if correct else -1.0)
    return ref_grpo_scores(R, group, norm_by_std, unbiased)


def ref_hapo_scores(r, group, L, fallback, unbiased):
    grpo = ref_grpo_scores(r, group, True, unbiased)
    score = [0.0] * len(r)
    for idx in groups_of(group).values():
        tok = [r[i] for i in idx for _ in range(L[i])]
        mu = sum(tok) / len(tok)
        sd = math.sqrt(sum((v - mu) ** 2 for v in tok) / len(tok))
        a = {i: (r[i] - mu) / (sd + 1e-6) for i in idx}
        vals = [r[i] for i in idx]
        if len(idx) < 2 or max(vals) == min(vals):
            continue
        use_grpo = any(abs(a[i]) >= fallback for i in idx)
        for i in idx:
            score[i] = grpo[i] if use_grpo else a[i]
    return score


ADV_CASES = [
    ("grpo", {}), ("grpo", {"std_unbiased": False}), ("dr_grpo", {}), ("dapo", {}),
    ("gspo", {}), ("dhpo", {}), ("fgo", {}), ("fgo", {"norm_by_std": True, "alpha": 0.5}),
    ("hapo", {}), ("hapo", {"adv_fallback": 1.2, "std_unbiased": False}),
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name,hp", ADV_CASES)
def test_advantages_match_loop(name, hp, seed):
    b = make_batch(seed)
    cfg = {**objective_defaults(name), **hp}
    r, group, mask = b["rewards"].tolist(), b["group"], b["mask"]
    L = mask.sum(-1).tolist()
    if name == "fgo":
        score = ref_fgo_scores(r, group, rows(mask, b["logp"]), cfg["reward_threshold"], cfg["alpha"],
                               cfg["entropy_beta"], cfg["norm_by_std"], cfg["std_unbiased"])
    elif name == "hapo":
        score = ref_hapo_scores(r, group, L, cfg["adv_fallback"], cfg["std_unbiased"])
    else:
        score = ref_grpo_scores(r, group, cfg["norm_by_std"], cfg["std_unbiased"])
    want = torch.tensor(score, dtype=D)[:, None] * mask
    got = get_objective(name, **hp).advantages(b["rewards"], group, mask, logp=b["logp"])
    assert got.dtype == D and got.shape == mask.shape
    assert torch.allclose(got, want, rtol=0, atol=1e-10), (got - want).abs().max()


# ------------------------------------------------------------------ loss references

def ppo_tok(ratio, a, el, eh, c=None):
    pg = max(-a * ratio, -a * min(max(ratio, 1 - el), 1 + eh))
    if c is not None and a < 0:
        pg = min(pg, -a * c)
    return pg


def kl_tok(lp, ref, kind):
    if kind == "k1":
        return lp - ref
    if kind == "k2":
        return 0.5 * (lp - ref) ** 2
    d = min(max(ref - lp, -20.0), 20.0)
    return min(max(math.exp(d) - d - 1, -10.0), 10.0)


def hapo_h_hat(ent_rows, q, compat):
    x = sorted(math.log(max(e, 1e-8)) for row in ent_rows for e in row)
    m = x[round(q * (len(x) - 1))]
    scale = math.sqrt(sum((v - m) ** 2 for v in x) / len(x))
    hmax, hmin = (x[-1] - m) / scale, (x[0] - m) / scale
    out = []
    for row in ent_rows:
        hs = []
        for e in row:
            h = (math.log(max(e, 1e-8)) - m) / scale
            hs.append(h / hmax if h > 0 else h / (hmin if compat else abs(hmin)))
        out.append(hs)
    return out


def ref_token_losses(name, c, lp, old, adv, ent):
    """Per-token losses (list of rows of valid tokens) by plain loops."""
    out = []
    hh = hapo_h_hat(ent, c["entropy_pivot"], c["hapo_code_compat"]) if name == "hapo" else None
    for i in range(len(lp)):
        L = len(lp[i])
        s = math.exp(sum(lp[i][t] - old[i][t] for t in range(L)) / L)
        row = []
        for t in range(L):
            r, a = math.exp(lp[i][t] - old[i][t]), adv[i][t]
            if name == "gspo":
                row.append(ppo_tok(s, a, c["eps_low"], c["eps_high"], c["dual_clip_c"]))
            elif name == "dhpo":
                w = 0.5 if c["mixing"] == "average" else ent[i][t] / max(ent[i])
                rc = min(max(r, 1 - c["eps_low"]), 1 + c["eps_high"])
                sc = min(max(s, 1 - c["seq_eps_low"]), 1 + c["seq_eps_high"])
                if c["mixing_form"] == "arithmetic":
                    R, Rc = w * r + (1 - w) * s, w * rc + (1 - w) * sc
                else:
                    R, Rc = r ** w * s ** (1 - w), rc ** w * sc ** (1 - w)
                row.append(max(-a * R, -a * Rc))
            elif name == "hapo":
                h = hh[i][t]
                cl = c["eps_low"] * (1 - c["clip_alpha"] * h) if h <= 0 else c["eps_low"]
                ch = c["eps_high"] * (1 + c["clip_alpha"] * h) if h > 0 else c["eps_high"]
                inside = 1 - cl / 2 < r < 1 + ch / 2
                a_ent = a * (1 + c["adv_beta"] * h)
                a_used = (a if inside else a_ent) if h > 0 else (a_ent if inside else a)
                row.append(ppo_tok(r, a_used, cl, ch, c["dual_clip_c"]))
            else:
                row.append(ppo_tok(r, a, c["eps_low"], c["eps_high"], c["dual_clip_c"]))
        out.append(row)
    return out


def ref_aggregate(tok, mode, C):
    n_seq = sum(1 for row in tok if row)
    if mode == "token-mean":
        return sum(sum(row) for row in tok) / sum(len(row) for row in tok)
    if mode == "seq-mean-token-mean":
        return sum(sum(row) / len(row) for row in tok) / n_seq
    if mode == "seq-mean-token-sum":
        return sum(sum(row) for row in tok) / n_seq
    return sum(sum(row) for row in tok) / (n_seq * C)


LOSS_CASES = [
    ("grpo", {}),
    ("grpo", {"beta": 0.1, "dual_clip_c": 3.0}),
    ("grpo", {"beta": 0.05, "kl_type": "k1", "loss_agg_mode": "seq-mean-token-mean"}),
    ("grpo", {"beta": 0.2, "kl_type": "k2", "loss_agg_mode": "seq-mean-token-sum"}),
    ("dr_grpo", {}), ("dr_grpo", {"max_response_len": 16}), ("dapo", {}), ("fgo", {}),
    ("gspo", {}), ("gspo", {"loss_agg_mode": "token-mean", "beta": 0.1}),
    ("hapo", {}), ("hapo", {"hapo_code_compat": True}),
    ("hapo", {"entropy_pivot": 0.5, "clip_alpha": 0.5, "adv_beta": 2.0, "loss_agg_mode": "seq-mean-token-mean"}),
    ("dhpo", {}), ("dhpo", {"mixing": "entropy"}), ("dhpo", {"mixing_form": "geometric"}),
    ("dhpo", {"mixing": "entropy", "mixing_form": "geometric", "beta": 0.1}),
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name,hp", LOSS_CASES)
def test_loss_matches_loop(name, hp, seed):
    b = make_batch(seed)
    c = {**objective_defaults(name), **hp}
    m = b["mask"]
    lp, old, adv, ref, ent = (rows(m, b[k]) for k in ("logp", "old", "adv", "ref", "ent"))
    tok = ref_token_losses(name, c, lp, old, adv, ent)
    if c["beta"] > 0:
        tok = [[v + c["beta"] * kl_tok(p, q, c["kl_type"]) for v, p, q in zip(tr, pr, qr)]
               for tr, pr, qr in zip(tok, lp, ref)]
    C = c["max_response_len"] or m.shape[1]
    want = ref_aggregate(tok, c["loss_agg_mode"], C)
    obj = get_objective(name, **hp)
    loss, metrics = obj.loss(b["logp"], b["old"], b["adv"], m, ref_logp=b["ref"], entropy=b["ent"])
    assert loss.item() == pytest.approx(want, rel=1e-10, abs=1e-12)
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    for key in ("clip_ratio", "clip_ratio/low", "clip_ratio/high", "ratio/mean", "entropy"):
        assert key in metrics
    assert ("kl" in metrics) == (c["beta"] > 0)
    if name in ("grpo", "dr_grpo", "dapo", "fgo") and c["dual_clip_c"] is None:
        # clip fraction by loop: the clipped branch is strictly larger
        n_clip = sum(
            1 for i in range(len(lp)) for t in range(len(lp[i]))
            if ppo_tok(math.exp(lp[i][t] - old[i][t]), adv[i][t], c["eps_low"], c["eps_high"])
            > -adv[i][t] * math.exp(lp[i][t] - old[i][t]))
        assert metrics["clip_ratio"] == pytest.approx(n_clip / int(m.sum()), abs=1e-12)
