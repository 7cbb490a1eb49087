"""HAPO adaptive temperature on a real vLLM engine (tiny random model), no Ray.

The rollout path really goes through the processor: every generated token is one scaled
logits row, each applied T_t equals ``adaptive_temperature`` on that row's raw logits, and
statistics that force T_t = T(1 - tau) or T(1 + tau) change what is sampled.
"""

import pytest
import torch

from rl.objectives import get_objective
from rl.objectives.hapo import EntropyStats, adaptive_temperature
from rollout.records import SampleRequest

pytestmark = pytest.mark.slow

G, MAX_NEW, TAU = 8, 16, 0.9
PROCESSOR = get_objective("hapo").rollout_logits_processor  # the FQCN the driver passes


@pytest.fixture(scope="module")
def worker(tiny_model_dir):
    from rollout.worker import RolloutWorker

    return RolloutWorker(tiny_model_dir, dtype="float32", max_model_len=128,
                         gpu_memory_utilization=0.05, seed=0, logits_processors=[PROCESSOR])


@pytest.fixture(scope="module")
def requests(worker):
    tok = worker.tokenizer
    out = []
    for i, q in enumerate(["What is 3 + 4?", "Please compute 6 times 7."]):
        text = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                       add_generation_prompt=True)
        out.append(SampleRequest(i, tok(text, add_special_tokens=False)["input_ids"]))
    return out


def _rollout(worker, requests, stats, tau=TAU, record=False):
    extra = {"hapo_temperature": {"tau": tau, "stats": stats.to_dict() if stats else None,
                                  "record": record}}
    return worker.generate(requests, group_size=G, max_new_tokens=MAX_NEW, temperature=1.0,
                           extra_args=extra)


def _recorded(worker):
    from rollout.hapo_temperature import pop_recorded_rows

    return worker.engine.collective_rpc(pop_recorded_rows)[0]


def test_applied_temperatures_are_adaptive_temperature_of_the_raw_logits(worker, requests):
    # statistics whose pivot sits inside the tiny model's entropy range, so rows differ
    probe = _rollout(worker, requests, None, record=True)
    ent = torch.stack([-(torch.log_softmax(r.double(), -1).exp() * torch.log_softmax(r.double(), -1)).sum()
                       for r, _, _ in _recorded(worker)])
    worker.logits_processor_metrics()
    mask = torch.ones(1, len(ent), dtype=torch.bool)
    stats = get_objective("hapo").batch_stats(mask, entropy=ent.unsqueeze(0))
    assert probe.stats.generated_tokens > 0

    res = _rollout(worker, requests, stats, record=True)
    rows = _recorded(worker)
    metrics = worker.logits_processor_metrics()
    # one scaled row per generated token: the engine sampled every token through the processor
    assert len(rows) == res.stats.generated_tokens == metrics["hapo/rollout_rows"]
    raw = torch.stack([r for r, _, _ in rows])
    applied = torch.tensor([t for _, _, t in rows])
    expected = adaptive_temperature(raw, stats, 1.0, TAU)
    torch.testing.assert_close(applied, expected, rtol=0, atol=1e-6)
    assert applied.max() - applied.min() > 0.05  # not a constant temperature
    assert metrics["hapo/temperature_mean"] == pytest.approx(float(applied.double().mean()), abs=1e-6)


def test_forced_cold_and_hot_temperatures_change_sampling(worker, requests):
    # pivot far above / below every entropy: ĥ = -1 (T_t = 0.1) or +1 (T_t = 1.9) for every token
    cold = EntropyStats(pivot=100.0, scale=1.0, h_max=1.0, h_min=-1.0)
    hot = EntropyStats(pivot=-100.0, scale=1.0, h_max=1.0, h_min=-1.0)
    res_cold = _rollout(worker, requests, cold)
    m_cold = worker.logits_processor_metrics()
    res_hot = _rollout(worker, requests, hot)
    m_hot = worker.logits_processor_metrics()
    assert m_cold["hapo/temperature_max"] == pytest.approx(0.1, abs=1e-6)
    assert m_hot["hapo/temperature_min"] == pytest.approx(1.9, abs=1e-6)

    def mean_raw_logprob(res):  # raw model log-probs (vLLM returns them before processors)
        lps = [lp for s in res.samples for lp in s.logprobs]
        return sum(lps) / len(lps)

    # cold sampling picks the raw model's likely tokens, hot sampling its unlikely ones
    assert mean_raw_logprob(res_cold) > mean_raw_logprob(res_hot) + 0.5


def test_requests_without_hapo_args_are_untouched(worker, requests):
    worker.generate(requests, group_size=2, max_new_tokens=4, temperature=1.0)
    assert worker.logits_processor_metrics() == {}
