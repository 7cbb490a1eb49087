"""HAPO: the entropy statistics the learner computes are of the same entropy the rollout's vLLM
processor scores, that of the raw logits, at any sampling temperature."""

import random

import pytest
import torch

pytest.importorskip("vllm")

from vllm import SamplingParams  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate  # noqa: E402

from rl.chunked_head import chunked_logits_logprobs  # noqa: E402
from rl.logprobs import _token_logprobs  # noqa: E402
from rl.objectives import get_objective  # noqa: E402
from rl.objectives.hapo import entropy_score, entropy_stats, logits_entropy  # noqa: E402
from rollout.hapo_temperature import EXTRA_ARGS_KEY, HAPOTemperatureProcessor  # noqa: E402


def _processor_temperatures(logits: torch.Tensor, stats, base_t: float, tau: float) -> torch.Tensor:
    """T_t the vLLM processor applies to each row of `logits` (raw, as vLLM hands them over)."""
    proc = HAPOTemperatureProcessor(None, torch.device("cpu"), False)
    params = SamplingParams(temperature=base_t, extra_args={EXTRA_ARGS_KEY: {
        "tau": tau, "stats": stats.to_dict(), "record": True}})
    n = logits.shape[0]
    proc.update_state(BatchUpdate(batch_size=n, removed=[], moved=[], added=[(i, params, [1], []) for i in range(n)]))
    proc.apply(logits.clone())
    rows = proc.recorded
    assert len(rows) == n and all(torch.equal(r, z) for (r, _, _), z in zip(rows, logits))
    return torch.tensor([t for _, _, t in rows], dtype=torch.float64)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_learner_statistics_and_processor_score_the_same_entropy(temperature):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 97, generator=gen) * torch.linspace(0.2, 6.0, 64).unsqueeze(1)  # varied entropies
    targets = torch.randint(0, 97, (64,), generator=gen)
    learner = get_objective("hapo")
    # the learner's entropies of the same logits, through both of its paths, at the temperature
    # rl.learner.update gives HAPO's entropies (entropy_temperature: raw logits)
    t_ent = 1.0 if learner.entropy_of_raw_logits else temperature
    _, full = _token_logprobs(logits, targets, t_ent, with_entropy=True)
    _, chunked = chunked_logits_logprobs(logits, targets, t_ent, with_entropy=True, chunk_tokens=16)
    raw = logits_entropy(logits)  # what the processor computes (adaptive_temperature)
    torch.testing.assert_close(full, raw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked, raw, rtol=1e-5, atol=1e-5)
    # statistics from the learner's entropies map the processor's rows onto the learner's ĥ
    mask = torch.ones(1, 64, dtype=torch.bool)
    stats = learner.batch_stats(mask, entropy=full.unsqueeze(0))
    assert stats == entropy_stats(raw.unsqueeze(0), mask, 0.8)
    temps = _processor_temperatures(logits, stats, temperature, tau=0.05)
    want = temperature * (1.0 + 0.05 * entropy_score(full.double(), stats))
    torch.testing.assert_close(temps, want, rtol=1e-5, atol=1e-6)
    # the tempered entropy is another quantity: scoring it would shift every ĥ
    _, tempered = _token_logprobs(logits, targets, 0.7, with_entropy=True)
    assert not torch.allclose(tempered, raw, atol=1e-3)


def test_learner_update_gives_hapo_raw_logit_entropies_at_any_temperature(tiny_model_dir, make_learner):
    """Learner at rollout.temperature 0.7: the batch statistics and the loss's per-token entropy
    are those of the model's raw logits, computed here with plain transformers."""
    from transformers import AutoModelForCausalLM

    from rl.learner import TrainBatch

    rng = random.Random(0)
    prompts = [[rng.randint(3, 400) for _ in range(rng.randint(4, 10))] for _ in range(6)]
    responses = [[rng.randint(3, 400) for _ in range(rng.randint(2, 9))] for _ in range(6)]
    batch = TrainBatch(prompts, responses, [[0.5] * len(r) for r in responses], [[-2.0] * len(r) for r in responses],
                       float(sum(map(len, responses))), 6.0, 9.0)
    learner = make_learner(tiny_model_dir, "model.dtype=float32", "objective.name=hapo", "rollout.temperature=0.7")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    with torch.no_grad():
        raw = [logits_entropy(model(torch.tensor([p + r])).logits[0, len(p) - 1: len(p) + len(r) - 1])
               for p, r in zip(prompts, responses)]
    everything = torch.cat(raw).double().unsqueeze(0)
    want = entropy_stats(everything, torch.ones_like(everything, dtype=torch.bool), 0.8)

    update = learner.updater
    assert update.entropy_temperature == 1.0 and update.temperature == 0.7
    got = update.global_batch_stats(batch)
    for field in ("pivot", "scale", "h_max", "h_min"):
        assert getattr(got, field) == pytest.approx(getattr(want, field), rel=1e-4, abs=1e-5), field

    seen = []
    token_loss = update.objective.token_loss

    def spy(logp, old_logp, adv, mask, entropy, batch_stats):
        seen.append(entropy[mask].detach().clone())
        return token_loss(logp, old_logp, adv, mask, entropy, batch_stats)

    update.objective.token_loss = spy
    update.accumulate_gradients(batch, got)
    assert sorted(torch.cat(seen).tolist()) == pytest.approx(sorted(torch.cat(raw).tolist()), rel=1e-4, abs=1e-5)
