"""The egtp length predictor: entropy-pooled prompt features, the online head, PLP updates."""

import math

import numpy as np
import pytest

from scheduling import make_policy, make_predictor
from scheduling.types import Seq


def _cluster_features(rng, centre, n):
    return [centre + 0.3 * rng.standard_normal(centre.size) for _ in range(n)]


def test_egtp_head_learns_a_synthetic_length_rule():
    """Prompts of two kinds (two clusters of hidden states): long answers (about 200 tokens) and
    short ones (about 20). Prompt ids and lengths are the same for both kinds, so only the
    features can tell them apart."""
    rng = np.random.default_rng(0)
    hidden = 48
    long_c, short_c = rng.standard_normal(hidden), rng.standard_normal(hidden)
    pred = make_predictor("egtp")
    tc = make_predictor("token_conditioned")
    gid = 0
    for step in range(12):  # twelve training steps of 4 prompts x 8 samples
        pred.begin_rollout(), tc.begin_rollout()
        for centre, mean in ((long_c, 200), (short_c, 20)):
            for f in _cluster_features(rng, centre, 2):
                for _ in range(8):
                    s = Seq(gid, gid, 30, 256, prompt_ids=(1, 2, 3), prompt_features=f)
                    n = int(np.clip(round(mean * math.exp(0.2 * rng.standard_normal())), 1, 256))
                    pred.observe(s, n)
                    tc.observe(s, n)
                gid += 1
    pred.begin_rollout(), tc.begin_rollout()
    got, tc_got = {}, {}
    for kind, centre in (("long", long_c), ("short", short_c)):
        for f in _cluster_features(rng, centre, 5):  # unseen prompts of each kind
            s = Seq(gid, gid, 30, 256, prompt_ids=(1, 2, 3), prompt_features=f)
            gid += 1
            got.setdefault(kind, []).append(pred.predict(s))
            tc_got.setdefault(kind, []).append(tc.predict(s))
    # the lognormal mean sits above the median (200 and 20) by the predictive spread
    assert 170 <= np.median(got["long"]) <= 256, got
    assert 10 <= np.median(got["short"]) <= 40, got
    assert min(got["long"]) > 3 * np.median(got["short"]), got
    # prompt ids alone cannot tell the kinds apart
    assert np.allclose(tc_got["long"], tc_got["short"])


def test_egtp_without_features_says_what_to_do():
    pred = make_predictor("egtp")
    with pytest.raises(ValueError, match="needs prompt features"):
        pred.predict(Seq(0, 0, 10, 64, prompt_ids=(1, 2)))


def test_egtp_projects_large_hidden_states():
    pred = make_predictor("egtp", max_dim=16)
    s = Seq(0, 0, 10, 64, prompt_features=np.ones(100))
    assert pred.features(s).shape == (2 + 16,)
    pred.observe(s, 30)
    with pytest.raises(ValueError, match="size 50"):
        pred.predict(Seq(1, 1, 10, 64, prompt_features=np.ones(50)))


def test_plp_updates_reach_the_sjf_refill():
    """Two prompts predicted alike before decoding; once a sibling of prompt 0 finished long and
    one of prompt 1 short, prompt 1's pending sample is refilled first, and a running sample
    that outlived its prediction is predicted longer than a fresh one."""
    rng = np.random.default_rng(1)
    f = rng.standard_normal(8)
    pol = make_policy("length_aware", predictor="egtp", admission="conservative", tail_guard=False)
    pred = pol.predictor
    seqs = [Seq(i, i // 2, 20, 256, prompt_features=f) for i in range(4)]  # two prompts x 2
    pol.begin_rollout(seqs)
    before = [pred.predict_remaining(s) for s in seqs]
    assert before[1] == pytest.approx(before[3])  # same features, same prompt length
    pol.on_finished(seqs[0], 250)
    pol.on_finished(seqs[2], 5)
    assert pred.predict_remaining(seqs[1]) > 2 * pred.predict_remaining(seqs[3])
    # room for one of them only
    running = [Seq(9, 9, 20, 256, generated=10, prompt_features=f)]
    cap = 20 + 10 + pred.predict_remaining(running[0]) + 20 + pred.predict_remaining(seqs[3]) + 1
    assert pol.plan([seqs[1], seqs[3]], running, kv_budget_tokens=int(cap), slots=4) == [3]
    # progress: a running sequence known to be past 100 tokens has more left than at 0
    late = Seq(5, 7, 20, 256, generated=100, prompt_features=f)
    early = Seq(6, 7, 20, 256, generated=0, prompt_features=f)
    assert late.generated + pred.predict_remaining(late) > 100 > pred.predict_remaining(early)


def test_prompt_encoder_pools_by_entropy_and_ignores_padding(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from rollout.prompt_encoder import PromptEncoder

    enc = PromptEncoder(tiny_model_dir, batch_size=4)
    short, long = [5, 9, 17, 3], [8, 1, 30, 12, 7, 7, 2, 40, 11]
    both = enc.encode([short, long])
    alone = enc.encode([short])
    assert both.shape == (2, enc.hidden_size)
    np.testing.assert_allclose(both[0], alone[0], rtol=1e-5, atol=1e-6)  # padding changes nothing
    # by hand: entropies of the next-token distributions weight the layer's hidden states
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(torch.tensor([long]), output_hidden_states=True)
    p = torch.softmax(out.logits[0], -1)
    ent = -(p * p.log()).sum(-1)
    want = (ent[:, None] / ent.sum() * out.hidden_states[enc.layer][0]).sum(0).numpy()
    np.testing.assert_allclose(both[1], want, rtol=1e-4, atol=1e-5)
    assert enc.layer == model.config.num_hidden_layers // 2
