"""Off-policy correction (`learner.behavior_correction`): decoupled PPO with truncated or masked
importance weights between the behavior policy (the engine) and the proximal one (the learner
at the start of the step). Hand-computed numbers, the arithmetic in comments."""

import dataclasses
import math
import random

import pytest
import torch

from rl.config import load_config
from rl.errors import ConfigError
from rl.objectives import OBJECTIVES, get_objective
from rl.objectives.common import (
    behavior_log_weight, correct_weight, ess_fraction, ess_sums, k3_from_log_ratio, sequence_log_mean,
)

E03 = math.exp(0.3)  # 1.3498588


def _t(rows):
    return torch.tensor(rows, dtype=torch.float64)


# --- (a) the pure loss: hand-made tiny cases ------------------------------------------------

def test_grpo_clipped_loss_with_truncated_and_masked_weight():
    obj = get_objective("grpo")
    lp, old, behav, adv = _t([[-1.0]]), _t([[-1.2]]), _t([[-1.5]]), _t([[1.0]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    # ratio e^0.2 = 1.221403 > 1.2: the clipped branch, -A * 1.2 = -1.2
    plain, m = obj.loss(lp, old, adv, mask)
    assert float(plain) == pytest.approx(-1.2) and m["clip_ratio"] == 1.0
    # w = exp(old - behav) = exp(-1.2 + 1.5) = e^0.3 = 1.349859
    log_w = behavior_log_weight(old, behav, mask)
    assert float(log_w) == pytest.approx(0.3)
    cases = {("truncate", 1.2): 1.2 * -1.2,       # min(1.349859, 1.2) = 1.2 -> -1.44
             ("mask", 1.2): 0.0,                  # 1.349859 > 1.2 -> weight 0
             ("truncate", 2.0): E03 * -1.2,       # under the cap: -1.2 * 1.349859 = -1.619831
             ("mask", 2.0): E03 * -1.2,
             ("none", 1.2): -1.2}                 # weight 1
    for (mode, cap), expected in cases.items():
        w = obj.behavior_weights(log_w, mask, mode, cap)
        loss, _ = obj.loss(lp, old, adv, mask, behavior_weight=w)
        assert float(loss) == pytest.approx(expected, abs=1e-9), (mode, cap)
    assert -1.44 == pytest.approx(1.2 * -1.2) and E03 * -1.2 == pytest.approx(-1.619831, abs=1e-6)


def test_weight_multiplies_the_policy_term_not_the_kl():
    obj = get_objective("grpo", beta=0.1)
    lp, old, ref, adv = _t([[-1.0]]), _t([[-1.2]]), _t([[-1.5]]), _t([[1.0]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    # policy term -1.2 (clipped) times w = 1.2; KL k3 with d = ref - lp = -0.5:
    # e^-0.5 + 0.5 - 1 = 0.106531, times beta 0.1, unweighted: -1.44 + 0.0106531 = -1.4293469
    loss, m = obj.loss(lp, old, adv, mask, ref_logp=ref, behavior_weight=_t([[1.2]]))
    assert m["kl"] == pytest.approx(0.106531, abs=1e-6)
    assert float(loss) == pytest.approx(-1.4293469, abs=1e-7)


def test_gradient_at_ratio_one_is_weight_times_advantage():
    obj = get_objective("grpo")
    lp = _t([[-1.0, -2.0]]).requires_grad_(True)
    mask = torch.ones(1, 2, dtype=torch.bool)
    # log w = [0.3, 1.0] -> w = [1.349859, e = 2.718] -> truncated at 2: [1.349859, 2.0]
    w = obj.behavior_weights(_t([[0.3, 1.0]]), mask, "truncate", 2.0)
    loss, _ = obj.loss(lp, lp.detach(), _t([[1.0, 1.0]]), mask, behavior_weight=w)
    # token-mean of -w * r with r = 1: -(1.349859 + 2) / 2 = -1.674929; d/d lp_t = -w_t / 2
    assert float(loss.detach()) == pytest.approx(-(E03 + 2.0) / 2)
    loss.backward()
    torch.testing.assert_close(lp.grad, _t([[-E03 / 2, -1.0]]))


def test_gspo_weights_at_sequence_level():
    obj = get_objective("gspo")
    # sequence a: token log-weights [0.1, 0.5] -> geometric mean e^0.3 = 1.349859 on both tokens;
    # sequence b: [-0.2, 0.0, 0.2] -> e^0 = 1
    log_w = _t([[0.1, 0.5, 0.0], [-0.2, 0.0, 0.2]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    raw = obj.behavior_weights(log_w, mask, "truncate", 10.0)
    torch.testing.assert_close(raw, _t([[E03, E03, 0.0], [1.0, 1.0, 1.0]]))
    trunc = obj.behavior_weights(log_w, mask, "truncate", 1.2)
    masked = obj.behavior_weights(log_w, mask, "mask", 1.2)
    torch.testing.assert_close(trunc, _t([[1.2, 1.2, 0.0], [1.0, 1.0, 1.0]]))
    torch.testing.assert_close(masked, _t([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]))
    # through the loss at s = 1, A = 1: every token -1, seq-mean-token-mean of -w_i:
    # truncate -(1.2 + 1) / 2 = -1.1; mask -(0 + 1) / 2 = -0.5
    lp = _t([[-1.0, -1.0, 0.0], [-1.0, -1.0, -1.0]])
    adv = torch.where(mask, 1.0, 0.0).double()
    assert float(obj.loss(lp, lp, adv, mask, behavior_weight=trunc)[0]) == pytest.approx(-1.1)
    assert float(obj.loss(lp, lp, adv, mask, behavior_weight=masked)[0]) == pytest.approx(-0.5)


def test_dhpo_mixes_token_and_sequence_weights():
    mask = torch.ones(1, 2, dtype=torch.bool)
    log_w = _t([[0.1, 0.5]])
    # token weights e^0.1 = 1.105171, e^0.5 = 1.648721 -> truncated at 1.5: [1.105171, 1.5];
    # sequence weight e^0.3 = 1.349859 (< 1.5)
    tok, seq = [math.exp(0.1), 1.5], E03
    avg = get_objective("dhpo").behavior_weights(log_w, mask, "truncate", 1.5)
    # average mixing, w = 0.5: [0.5 (1.105171 + 1.349859), 0.5 (1.5 + 1.349859)] = [1.227515, 1.424929]
    torch.testing.assert_close(avg, _t([[0.5 * (tok[0] + seq), 0.5 * (tok[1] + seq)]]))
    assert float(avg[0, 0]) == pytest.approx(1.227515, abs=1e-6)
    geo = get_objective("dhpo", mixing_form="geometric").behavior_weights(log_w, mask, "truncate", 1.5)
    # geometric: sqrt(1.105171 * 1.349859) = e^0.2 = 1.221403, sqrt(1.5 * 1.349859) = 1.422951
    torch.testing.assert_close(geo, _t([[math.exp(0.2), math.sqrt(1.5 * seq)]]))
    ent = get_objective("dhpo", mixing="entropy").behavior_weights(log_w, mask, "truncate", 1.5,
                                                                   entropy=_t([[2.0, 1.0]]))
    # entropies [2, 1] -> w = [1, 0.5]: [1.105171, 0.5 (1.5 + 1.349859)]
    torch.testing.assert_close(ent, _t([[tok[0], 0.5 * (tok[1] + seq)]]))
    masked = get_objective("dhpo").behavior_weights(log_w, mask, "mask", 1.2)
    # mask at 1.2: tokens [1.105171, 0], sequence 1.349859 > 1.2 -> 0: [0.552585, 0]
    torch.testing.assert_close(masked, _t([[0.5 * tok[0], 0.0]]))


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "dapo", "fgo", "hapo"])
def test_token_level_objectives_use_the_default(name):
    log_w = _t([[0.3, -0.5, 2.0]])
    mask = torch.tensor([[True, True, False]])
    got = get_objective(name).behavior_weights(log_w, mask, "truncate", 1.2)
    torch.testing.assert_close(got[mask], _t([1.2, math.exp(-0.5)]))


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_weight_of_one_changes_nothing_and_padding_garbage_is_ignored(name):
    obj = get_objective(name)
    gen = torch.Generator().manual_seed(0)
    lp = -torch.rand(3, 4, generator=gen, dtype=torch.float64)
    old = lp - 0.1 * torch.rand(3, 4, generator=gen, dtype=torch.float64)
    adv = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    ent = torch.rand(3, 4, generator=gen, dtype=torch.float64) + 0.1
    kw = dict(entropy=ent) if obj.needs_entropy else {}
    plain, _ = obj.loss(lp, old, adv, mask, **kw)
    ones = torch.where(mask, 1.0, float("nan")).double()  # NaN padding must not leak
    weighted, _ = obj.loss(lp, old, adv, mask, behavior_weight=ones, **kw)
    assert float(weighted) == float(plain)


# --- the pure helpers ------------------------------------------------------------------------

def test_helpers_by_hand():
    w = _t([[0.5, 1.5, 3.0]])
    torch.testing.assert_close(correct_weight(w, "truncate", 2.0), _t([[0.5, 1.5, 2.0]]))
    torch.testing.assert_close(correct_weight(w, "mask", 2.0), _t([[0.5, 1.5, 0.0]]))
    torch.testing.assert_close(correct_weight(w, "none", 2.0), _t([[1.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="truncate, mask"):
        correct_weight(w, "clip", 2.0)
    # ESS of weights [1, 3]: (1 + 3)^2 / (2 * (1 + 9)) = 16 / 20 = 0.8; the padded 100 is ignored
    mask = torch.tensor([[True, True, False]])
    sums = ess_sums(_t([[1.0, 3.0, 100.0]]), mask)
    assert sums == (4.0, 10.0, 2.0) and ess_fraction(*sums) == pytest.approx(0.8)
    assert ess_fraction(0.0, 0.0, 0.0) == 1.0
    # k3 at d = 0.3: e^0.3 - 0.3 - 1 = 0.049859; at 0: 0
    torch.testing.assert_close(k3_from_log_ratio(_t([0.3, 0.0])), _t([E03 - 1.3, 0.0]))
    # log w = prox - behav, 0 in padding (even NaN there), clamped to +-20
    lw = behavior_log_weight(_t([[-1.0, -1.0, float("nan")]]), _t([[-1.3, -50.0, 0.0]]), mask)
    torch.testing.assert_close(lw, _t([[0.3, 20.0, 0.0]]))
    torch.testing.assert_close(sequence_log_mean(_t([[0.1, 0.5, 9.0]]), mask), _t([0.3]))


def test_mismatch_kl_estimates_kl_behavior_to_proximal():
    """k3 at tokens drawn from the behavior mu, d = log pi_prox - log mu: its mean is KL(mu || pi)."""
    mu = torch.softmax(_t([0.3, 0.2, 0.0, -0.2, -0.3]), 0)
    pi = torch.softmax(_t([1.0, 0.5, 0.0, -0.5, -1.0]), 0)
    exact = float((mu * (mu.log() - pi.log())).sum())
    y = torch.multinomial(mu, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    k3 = k3_from_log_ratio(pi.log()[y] - mu.log()[y])
    stderr = float(k3.std()) / math.sqrt(k3.numel())
    assert float(k3.mean()) == pytest.approx(exact, abs=4 * stderr)
    assert abs(float((pi.log()[y] - mu.log()[y]).mean()) + exact) < 4 * stderr * 10  # k1 agrees, noisier


# --- (b) a toy bandit: the corrected surrogate recovers the on-policy gradient --------------

def test_bandit_truncated_is_recovers_the_on_policy_gradient():
    """Softmax policy pi_theta over 5 arms; 200k samples from a DIFFERENT behavior policy mu.

    pi = softmax([1, .5, 0, -.5, -1]) = [.4287, .2600, .1577, .0956, .0580]
    mu = softmax([.3, .2, 0, -.2, -.3]) = [.2631, .2380, .1949, .1596, .1444]
    w = pi / mu = [1.629, 1.092, .809, .599, .402], all under the cap C = 2: truncation is inactive,
    so the corrected estimator is unbiased. Rewards [0, 1, 0, 1, .5], advantage A = r - E_mu[r]
    (a constant baseline leaves E_pi[A grad log pi] unchanged).

    True gradient g = grad sum_k pi_k A_k = [-.1649, .1600, -.0607, .0589, .0067], |g| = .2449.
    The estimator's RMS error at n = 200k is sqrt((E_mu |w A (e_y - pi)|^2 - |g|^2) / n) = 7.5e-4,
    so the tolerance 3e-3 is 4 of them. The uncorrected E_mu[A grad log pi] is off by 0.067.
    """
    theta0 = _t([1.0, 0.5, 0.0, -0.5, -1.0])
    mu = torch.softmax(_t([0.3, 0.2, 0.0, -0.2, -0.3]), 0)
    rewards = _t([0.0, 1.0, 0.0, 1.0, 0.5])
    adv = rewards - float((mu * rewards).sum())
    theta = theta0.clone().requires_grad_(True)
    (g_true,) = torch.autograd.grad((torch.softmax(theta, 0) * adv).sum(), theta)
    assert float(g_true.norm()) == pytest.approx(0.2449, abs=1e-4)
    n = 200_000
    y = torch.multinomial(mu, n, replacement=True, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(n, 1, dtype=torch.bool)
    obj = get_objective("grpo")

    def estimate(mode):
        theta = theta0.clone().requires_grad_(True)
        logp = torch.log_softmax(theta, 0)[y][:, None]  # prox = current: r = 1
        old = logp.detach()
        weight = None
        if mode != "none":
            weight = obj.behavior_weights(behavior_log_weight(old, mu.log()[y][:, None], mask), mask, mode, 2.0)
            assert float(weight.max()) <= 2.0
        loss, _ = obj.loss(logp, old, adv[y][:, None], mask, behavior_weight=weight)
        (grad,) = torch.autograd.grad(loss, theta)
        return -grad  # the loss is minimized: its gradient is minus the policy gradient

    err_truncate = float((estimate("truncate") - g_true).norm())
    err_mask = float((estimate("mask") - g_true).norm())
    err_none = float((estimate("none") - g_true).norm())
    assert err_truncate < 3e-3
    assert err_mask == pytest.approx(err_truncate)  # no weight above the cap: the same estimator
    assert err_none > 0.05
    assert err_none > 10 * err_truncate


# --- (c) one epoch, one mini-batch, mode none: today's update, bit for bit -------------------

def _former_step(update, batch):
    """PolicyUpdate.step as it was before ppo_epochs / mini_batches / behavior correction (one
    rank, no FSDP): old_logp = logp.detach(), one optimizer step."""
    from rl.logprobs import response_logprobs, right_align
    from rl.objectives.common import LossNorm

    policy, obj = update.policy, update.objective
    update.optimizer.zero_grad(set_to_none=True)
    policy.net.train()
    norm = LossNorm(batch.num_tokens, batch.num_seqs, batch.max_len)
    lengths = [len(p) + len(r) for p, r in zip(batch.prompt_ids, batch.response_ids)]
    sums, total_loss, processed, real, micro_batches = {}, 0.0, 0, 0, 0
    for idx, mb, ref_mb, (p1, r1) in update.micro_batches(batch.prompt_ids, batch.response_ids,
                                                           with_ref=obj.needs_ref):
        micro_batches += 1
        processed += mb.num_processed_tokens + p1
        real += mb.num_real_tokens + r1
        T = mb.response_ids.shape[1]
        adv = right_align([batch.advantages[i] for i in idx], T)
        rollout_lp = right_align([batch.rollout_logprobs[i] for i in idx], T)
        logp, entropy = response_logprobs(policy.net, mb, update.temperature, with_entropy=True)
        old_logp = logp.detach()
        loss, metrics = obj.loss(logp, old_logp, adv, mb.response_mask,
                                 entropy=entropy if obj.needs_entropy else None, norm=norm)
        loss.backward()
        total_loss += float(loss.detach())
        n_tok = float(mb.num_response_tokens)
        metrics = dict(metrics)
        metrics["entropy"] = float(entropy[mb.response_mask].float().mean()) if n_tok else 0.0
        metrics["train/rollout_logprob_abs_diff"] = float((rollout_lp - old_logp)[mb.response_mask].abs().mean())
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v) * n_tok
    keys = sorted(sums)
    reduced = torch.tensor([total_loss, float(sum(len(r) for r in batch.response_ids)), float(sum(lengths)),
                            float(processed), float(real)] + [sums[k] for k in keys], dtype=torch.float64)
    grad_norm = torch.nn.utils.clip_grad_norm_(update.params, update.config.grad_clip)
    update.optimizer.step()
    update.scheduler.step()
    global_tokens = max(float(reduced[1]), 1.0)
    out = {k: float(reduced[5 + j]) / global_tokens for j, k in enumerate(keys)}
    out.update({"loss": float(reduced[0]), "grad_norm": float(grad_norm), "lr": update.scheduler.get_last_lr()[0],
                "train/micro_batches": float(micro_batches),
                "train/padding_fraction": (float(processed) - float(real)) / float(processed),
                "train/tokens": float(reduced[2]), "train/processed_tokens": float(reduced[3])})
    return out


def _train_batch(seed=0, n=8, vocab=400):
    from rl.learner import TrainBatch

    rng = random.Random(seed)
    prompts = [[rng.randint(3, vocab) for _ in range(rng.randint(4, 12))] for _ in range(n)]
    responses = [[rng.randint(3, vocab) for _ in range(rng.randint(1, 12))] for _ in range(n)]
    adv = [[rng.uniform(-1, 1)] * len(r) for r in responses]
    roll = [[-rng.uniform(3, 8) for _ in r] for r in responses]
    n_tok = float(sum(len(r) for r in responses))
    return TrainBatch(prompts, responses, adv, roll, n_tok, float(n), 12.0)


@pytest.mark.parametrize("objective", ["grpo", "gspo", "dr_grpo"])
def test_one_epoch_mode_none_is_the_former_update_bit_for_bit(tiny_model_dir, make_learner, objective):
    settings = ["model.dtype=float32", "learner.lr=1e-2", "learner.micro_batch_tokens=40", f"objective.name={objective}",
                "learner.ppo_epochs=1", "learner.mini_batches=1", "learner.behavior_correction.mode=none"]
    new, old = make_learner(tiny_model_dir, *settings), make_learner(tiny_model_dir, *settings)
    batch = _train_batch(seed=1)
    got, _ = new.update(batch)
    want = _former_step(old.updater, batch)
    for key, value in want.items():
        assert got[key] == value, key  # exactly, every metric of the former update
    for (name, p), (_, q) in zip(new.policy.net.named_parameters(), old.policy.net.named_parameters()):
        assert torch.equal(p.grad, q.grad), name
        assert torch.equal(p.detach(), q.detach()), name
    assert got["actor/optimizer_steps"] == 1.0 and got["time/proximal_logprobs"] == 0.0


def test_truncate_scales_the_gradient_by_the_weight(tiny_model_dir, make_learner):
    """One epoch, one mini-batch: the proximal log-probs are the training forward's. With the
    behavior log-probs set to prox - 0.1 on every token, every weight is e^0.1 = 1.105171 (< cap 2),
    so the loss and the gradient are e^0.1 times mode none's; mask with cap 1.1 drops every token."""
    batch = _train_batch(seed=2)
    base = ["model.dtype=float32", "learner.micro_batch_tokens=40", "objective.name=gspo",
            "learner.grad_clip=0"]  # p.grad after the step: unclipped
    grads, losses = {}, {}
    for mode, cap in (("none", 2.0), ("truncate", 2.0), ("mask", 1.1)):
        learner = make_learner(tiny_model_dir, *base, f"learner.behavior_correction.mode={mode}",
                               f"learner.behavior_correction.cap={cap}")
        update = learner.updater
        prox = update.proximal_logprobs(batch, [list(range(len(batch.response_ids)))])
        shifted = dataclasses.replace(batch, rollout_logprobs=[(p - 0.1).tolist() for p in prox])
        metrics, _ = learner.update(shifted)
        grads[mode] = {n: p.grad.clone() for n, p in learner.policy.net.named_parameters()}
        losses[mode] = metrics
    factor = math.exp(0.1)
    assert losses["truncate"]["loss"] == pytest.approx(factor * losses["none"]["loss"], rel=1e-5)
    for name, g in grads["none"].items():
        torch.testing.assert_close(grads["truncate"][name], factor * g, rtol=1e-4, atol=1e-7)
        assert float(grads["mask"][name].abs().max()) == 0.0
    assert losses["mask"]["loss"] == 0.0
    # the behavior metrics see the same gap in every mode: w = e^0.1 on every token
    for m in losses.values():
        assert m["behavior/ess_fraction"] == pytest.approx(1.0, abs=1e-9)
        assert m["behavior/weight_max"] == pytest.approx(factor, rel=1e-5)
        assert m["behavior/mismatch_kl"] == pytest.approx(factor - 0.1 - 1.0, rel=1e-3)  # k3 = 0.005171
    assert losses["mask"]["behavior/over_cap_fraction"] == 1.0 and losses["none"]["behavior/over_cap_fraction"] == 0.0


# --- (d) config errors -------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("learner.mini_batches=0", r"learner.mini_batches = 0 must be an integer >= 1"),
    ("learner.ppo_epochs=0", r"learner.ppo_epochs = 0 must be an integer >= 1"),
    ("learner.behavior_correction.cap=0", r"learner.behavior_correction.cap = 0.0 must be > 0.*mode: none"),
    ("learner.behavior_correction.cap=-1", r"learner.behavior_correction.cap = -1.0 must be > 0"),
    ("learner.behavior_correction.mode=clip", r"learner.behavior_correction.mode = 'clip'.*truncate, mask, none"),
])
def test_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_mini_batches_larger_than_prompts_per_step():
    with pytest.raises(ConfigError, match=r"learner.mini_batches = 5 is larger than data.prompts_per_step = 4.*lower"):
        load_config(None, ["learner.mini_batches=5", "data.prompts_per_step=4"])
    c = load_config(None, ["learner.mini_batches=4", "data.prompts_per_step=4", "learner.ppo_epochs=3"])
    assert (c.learner.mini_batches, c.learner.ppo_epochs) == (4, 3)


def test_defaults():
    c = load_config(None, []).learner
    assert (c.ppo_epochs, c.mini_batches) == (1, 1)
    assert (c.behavior_correction.mode, c.behavior_correction.cap) == ("truncate", 2.0)
