"""Properties of every objective: gradients, masking, equal policies, split invariance, registry."""

import dataclasses
import math
import subprocess
import sys

import pytest
import torch

from rl.objectives import (
    AGG_MODES, OBJECTIVES, aggregate, entropy_score, get_objective, objective_defaults,
    register_objective,
)
from rl.objectives.base import Objective

D = torch.float64
NAMES = ["grpo", "dr_grpo", "dapo", "gspo", "fgo", "hapo", "dhpo"]
# every objective plus the option variants that change the loss's code path
VARIANTS = [(n, {}) for n in NAMES] + [
    ("grpo", {"beta": 0.1, "dual_clip_c": 3.0}),
    ("dhpo", {"mixing": "entropy"}),
    ("dhpo", {"mixing": "entropy", "mixing_form": "geometric"}),
    ("hapo", {"hapo_code_compat": True, "beta": 0.05, "kl_type": "k2"}),
]


def batch(seed=0, N=10, T=9, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    lengths[3] = 0  # an empty row (e.g. data-parallel padding) must count for nothing
    lengths[0] = T
    mask = torch.arange(T)[None, :] < lengths[:, None]
    old = -3 * torch.rand(N, T, generator=g, dtype=D) - 0.05
    logp = old + noise * torch.randn(N, T, generator=g, dtype=D)
    adv = torch.randn(N, 1, generator=g, dtype=D).expand(N, T) * mask
    ref = logp + 0.3 * torch.randn(N, T, generator=g, dtype=D)
    ent = 3 * torch.rand(N, T, generator=g, dtype=D) + 0.01
    return dict(logp=logp, old=old, adv=adv, mask=mask, ref=ref, ent=ent)


def call(obj, b, logp, rows=None, **kw):
    """obj.loss on a subset of rows, trimmed to the subset's own max length (like a packer)."""
    if rows is None:
        rows = torch.arange(b["mask"].shape[0])
    tmax = max(int(b["mask"][rows].sum(-1).max()), 1)
    pick = lambda x: x[rows][:, :tmax]  # noqa: E731
    return obj.loss(pick(logp), pick(b["old"]), pick(b["adv"]), pick(b["mask"]),
                    ref_logp=pick(b["ref"]), entropy=pick(b["ent"]), **kw)


# ------------------------------------------------------------------ gradients

@pytest.mark.parametrize("name,hp", VARIANTS)
def test_gradcheck(name, hp):
    # GSPO's sequence ratio lives in a 1e-4 trust region: small noise keeps it unclipped
    b = batch(1, N=5, T=4, noise=1e-5 if name == "gspo" else 0.3)
    obj = get_objective(name, **hp)
    lp = b["logp"].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: call(obj, b, x)[0], (lp,), eps=1e-6, atol=1e-7)
    loss, _ = call(obj, b, lp)
    (grad,) = torch.autograd.grad(loss, lp)
    assert grad.abs().sum() > 0  # the gradient actually flows


# ------------------------------------------------------------------ masking

@pytest.mark.parametrize("name,hp", VARIANTS)
def test_masked_garbage_changes_nothing(name, hp):
    b = batch(2)
    obj = get_objective(name, **hp)
    m = b["mask"]
    junk = dict(b)
    g = torch.Generator().manual_seed(9)
    for k in ("logp", "old", "adv", "ref", "ent"):
        garbage = 1e4 * torch.randn(m.shape, generator=g, dtype=D)
        garbage[~m & (torch.rand(m.shape, generator=g) < 0.3)] = float("nan")
        garbage[3, 0] = float("inf")  # row 3 is empty
        junk[k] = torch.where(m, b[k], garbage)
    lp1 = b["logp"].clone().requires_grad_()
    lp2 = junk["logp"].clone().requires_grad_()
    l1, m1 = call(obj, b, lp1)
    l2, m2 = call(obj, junk, lp2)
    (g1,) = torch.autograd.grad(l1, lp1)
    (g2,) = torch.autograd.grad(l2, lp2)
    assert torch.isfinite(l2) and l1.item() == pytest.approx(l2.item(), rel=1e-12, abs=1e-14)
    assert torch.allclose(g1, g2, rtol=1e-12, atol=1e-14)
    assert torch.equal(g2[~m], torch.zeros_like(g2[~m]))
    assert m1 == pytest.approx(m2, rel=1e-12, abs=1e-14)


@pytest.mark.parametrize("name", NAMES)
def test_advantages_zero_where_masked_and_degenerate_groups(name):
    obj = get_objective(name)
    mask = torch.arange(6)[None, :] < torch.tensor([6, 3, 1, 4, 2])[:, None]
    logp = torch.where(mask, -torch.rand(5, 6, dtype=D) - 0.1, torch.tensor(float("nan"), dtype=D))
    group = torch.tensor([0, 0, 0, 4, 4])
    adv = obj.advantages(torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0], dtype=D), group, mask, logp=logp)
    assert torch.isfinite(adv).all() and torch.equal(adv[~mask], torch.zeros_like(adv[~mask]))
    assert (adv[mask] != 0).all()
    # a group of one gets 0 for every objective
    single = obj.advantages(torch.tensor([1.0], dtype=D), torch.tensor([3]), mask[:1], logp=logp[:1])
    assert torch.equal(single, torch.zeros_like(single))
    if name != "fgo":  # FGO reshapes all-equal groups by length and entropy on purpose
        eq = obj.advantages(torch.full((5,), 0.7, dtype=D), group, mask, logp=logp)
        assert torch.equal(eq, torch.zeros_like(eq))


# ------------------------------------------------------------------ equal policies

@pytest.mark.parametrize("name,hp", VARIANTS)
def test_equal_policies(name, hp):
    b = batch(3)
    obj = get_objective(name, **hp)
    b["old"] = b["logp"].clone()
    if obj.needs_ref:
        b["ref"] = b["logp"].clone()  # KL(pi || pi) = 0 for k1, k2, k3
    loss, met = call(obj, b, b["logp"])
    m, a = b["mask"], b["adv"]
    assert met["clip_ratio"] == 0.0 and met["ratio/mean"] == pytest.approx(1.0, abs=1e-15)
    if name == "hapo":
        # inside the neutral zone: high-entropy tokens keep A, the others use A*(1 + ĥ)
        h = entropy_score(b["ent"], obj.batch_stats(m, b["ent"]))
        a = torch.where(h > 0, a, a * (1 + h))
    want = -aggregate(a, m, obj.cfg.loss_agg_mode)
    assert loss.item() == pytest.approx(want.item(), rel=1e-12, abs=1e-14)
    if obj.cfg.loss_agg_mode == "token-mean" and name != "hapo":
        assert loss.item() == pytest.approx(-(a[m].mean()).item(), rel=1e-12)


# ------------------------------------------------------------------ split invariance

def pieces_micro(n):
    return [torch.arange(0, 3), torch.arange(3, 5), torch.arange(5, n)]


def pieces_dp(n):
    # two ranks (interleaved rows), each processing two micro-batches
    rank0, rank1 = torch.arange(0, n, 2), torch.arange(1, n, 2)
    return [rank0[:2], rank0[2:], rank1[:3], rank1[3:]]


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("name,hp", VARIANTS)
def test_split_invariance(name, hp, mode):
    b = batch(4)
    obj = get_objective(name, **{**hp, "loss_agg_mode": mode})
    lp = b["logp"].clone().requires_grad_()
    whole, _ = call(obj, b, lp)
    (g_whole,) = torch.autograd.grad(whole, lp)
    # the learner computes these once from the global batch
    norm, stats = obj.loss_norm(b["mask"]), obj.batch_stats(b["mask"], b["ent"])
    n = b["mask"].shape[0]
    for split in (pieces_micro(n), pieces_dp(n)):
        total = sum(call(obj, b, lp, rows, norm=norm, batch_stats=stats)[0] for rows in split)
        (g,) = torch.autograd.grad(total, lp)
        assert total.item() == pytest.approx(whole.item(), rel=1e-12, abs=1e-12)
        assert torch.allclose(g, g_whole, rtol=0, atol=1e-10), (g - g_whole).abs().max()


@pytest.mark.parametrize("name", ["grpo", "hapo"])
def test_split_without_global_counts_differs(name):
    # the invariance test above can fail: local normalization / local entropy stats change it
    b = batch(4)
    obj = get_objective(name)
    lp = b["logp"].clone().requires_grad_()
    (g_whole,) = torch.autograd.grad(call(obj, b, lp)[0], lp)
    norm = obj.loss_norm(b["mask"])
    local = sum(call(obj, b, lp, rows, norm=norm if name == "hapo" else None)[0]
                for rows in pieces_micro(10))
    (g,) = torch.autograd.grad(local, lp)
    assert (g - g_whole).abs().max() > 1e-4


# ------------------------------------------------------------------ registry and config

def test_registered_names():
    assert set(NAMES) <= set(OBJECTIVES)
    for name in OBJECTIVES:
        obj = get_objective(name)
        assert obj.name == name and isinstance(obj, Objective)
        fields = {f.name: f.default for f in dataclasses.fields(obj.Config)}
        assert objective_defaults(name) == fields


def test_unknown_name_lists_valid():
    with pytest.raises(ValueError) as err:
        get_objective("nope")
    assert "'nope'" in str(err.value)
    assert all(name in str(err.value) for name in NAMES)


def test_unknown_hparam_lists_valid():
    with pytest.raises(ValueError) as err:
        get_objective("hapo", eps_hgih=0.3)
    msg = str(err.value)
    assert "eps_hgih" in msg and "eps_high" in msg and "entropy_pivot" in msg and "hapo" in msg
    with pytest.raises(ValueError, match="objective"):
        objective_defaults("nope")


@pytest.mark.parametrize("name,bad", [
    ("grpo", {"loss_agg_mode": "mean"}), ("grpo", {"kl_type": "k4"}), ("grpo", {"eps_low": 1.5}),
    ("grpo", {"beta": -1.0}), ("dhpo", {"mixing": "max"}), ("dhpo", {"mixing_form": "harmonic"}),
    ("hapo", {"entropy_pivot": 1.5}), ("dapo", {"max_gen_batches": 0}),
])
def test_invalid_values(name, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        get_objective(name, **bad)


def test_duplicate_registration_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        @register_objective("grpo")
        class Again(Objective):  # noqa: F841
            pass
    assert OBJECTIVES["grpo"].__name__ == "GRPO"


def test_flags_and_missing_inputs():
    b = batch(0)
    assert not get_objective("grpo").needs_ref and get_objective("grpo", beta=0.1).needs_ref
    assert get_objective("hapo").needs_entropy and not get_objective("dhpo").needs_entropy
    assert get_objective("dhpo", mixing="entropy").needs_entropy
    assert not any(get_objective(n).needs_entropy for n in ("grpo", "dr_grpo", "dapo", "gspo", "fgo"))
    args = (b["logp"], b["old"], b["adv"], b["mask"])
    with pytest.raises(ValueError, match="ref_logp"):
        get_objective("grpo", beta=0.1).loss(*args)
    with pytest.raises(ValueError, match="entropy"):
        get_objective("hapo").loss(*args)
    with pytest.raises(ValueError, match="logp"):
        get_objective("fgo").advantages(torch.ones(10), torch.zeros(10, dtype=torch.long), b["mask"])


def test_no_ray_or_vllm_import():
    code = ("import sys, rl.objectives; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('ray', 'vllm')]; assert not bad, bad; print('clean')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "clean" in out.stdout, out.stderr
