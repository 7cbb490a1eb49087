"""Packed and padded micro-batches give the per-sequence log-probs and the same gradient."""

import random

import pytest
import torch

from rl.logprobs import (SharedPrompts, make_micro_batch, make_packed_micro_batch,
                         make_response_micro_batch, response_logprobs, right_align)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def _random_batch(vocab: int, n: int, seed: int, empty_response: bool = True):
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(1, 12))] for _ in range(n)]
    responses = [[rng.randrange(vocab) for _ in range(rng.randint(1, 20))] for _ in range(n)]
    if empty_response:
        responses[1] = []
    return prompts, responses


def _reference(model, prompts, responses, temperature=1.0):
    """Each sequence alone, unpadded: log-probs and entropies [n, T], right-aligned."""
    T = max(1, max(len(r) for r in responses))
    logp_rows, ent_rows = [], []
    for p, r in zip(prompts, responses):
        if not r:
            logp_rows.append([]), ent_rows.append([])
            continue
        logits = model(input_ids=torch.tensor([p + r]), use_cache=False).logits[0].float() / temperature
        lp_all = torch.log_softmax(logits[len(p) - 1:-1], -1)
        logp_rows.append(lp_all.gather(-1, torch.tensor(r)[:, None])[:, 0])
        ent_rows.append(-(lp_all.exp() * lp_all).sum(-1))
    logp = torch.zeros(len(prompts), T)
    ent = torch.zeros(len(prompts), T)
    for i, (a, b) in enumerate(zip(logp_rows, ent_rows)):
        if len(a):
            logp[i, T - len(a):] = a
            ent[i, T - len(b):] = b
    return logp, ent


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_packed_logprobs_equal_per_sequence(tiny_model, temperature):
    prompts, responses = _random_batch(tiny_model.config.vocab_size, 6, seed=0)
    with torch.no_grad():
        ref_logp, ref_ent = _reference(tiny_model, prompts, responses, temperature)
        mb = make_packed_micro_batch(prompts, responses, pad_id=0)
        logp, ent = response_logprobs(tiny_model, mb, temperature, with_entropy=True)
    assert mb.input_ids.shape == (1, sum(len(p) + len(r) for p, r in zip(prompts, responses)))
    assert logp.shape == ref_logp.shape and torch.equal(mb.response_mask, ref_logp != 0)
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=0)


def test_padded_logprobs_equal_per_sequence(tiny_model):
    prompts, responses = _random_batch(tiny_model.config.vocab_size, 6, seed=1)
    with torch.no_grad():
        ref_logp, _ = _reference(tiny_model, prompts, responses)
        logp, _ = response_logprobs(tiny_model, make_micro_batch(prompts, responses, pad_id=0))
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=0)


def test_packed_sequences_do_not_see_each_other(tiny_model):
    # Changing the first sequence's tokens must not move the second one's log-probs: the
    # block-diagonal mask, not the causal one, is in effect.
    prompts, responses = _random_batch(tiny_model.config.vocab_size, 2, seed=2, empty_response=False)
    with torch.no_grad():
        a, _ = response_logprobs(tiny_model, make_packed_micro_batch(prompts, responses, 0))
        prompts[0] = [(t + 1) % tiny_model.config.vocab_size for t in prompts[0]]
        b, _ = response_logprobs(tiny_model, make_packed_micro_batch(prompts, responses, 0))
    assert not torch.allclose(a[0], b[0])
    torch.testing.assert_close(a[1], b[1], atol=1e-6, rtol=0)


def test_packed_scatter_is_differentiable(tiny_model):
    prompts, responses = _random_batch(tiny_model.config.vocab_size, 3, seed=3)
    mb = make_packed_micro_batch(prompts, responses, 0)
    logp, _ = response_logprobs(tiny_model, mb)
    logp.sum().backward()
    grads = [p.grad for p in tiny_model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    tiny_model.zero_grad(set_to_none=True)


def test_packed_rejects_empty_prompt():
    with pytest.raises(ValueError, match="non-empty prompt"):
        make_packed_micro_batch([[]], [[1, 2]], 0)


# --- the learner: gradient of the packed update equals the unpacked one ---------------------

def _train_batch(vocab: int, n: int, seed: int):
    from rl.learner import TrainBatch

    prompts, responses = _random_batch(vocab, n, seed)
    gen = torch.Generator().manual_seed(seed)
    adv = [torch.randn(len(r), generator=gen).tolist() for r in responses]
    roll = [(-torch.rand(len(r), generator=gen)).tolist() for r in responses]
    n_tok = float(sum(len(r) for r in responses))
    n_seq = float(sum(bool(r) for r in responses))
    return TrainBatch(prompts, responses, adv, roll, n_tok, n_seq, float(max(map(len, responses))))


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("objective", ["grpo", "gspo"])
def test_learner_packed_gradient_equals_unpacked(tiny_model_dir, make_learner, objective):
    from rl.objectives.common import LossNorm

    # A budget of 40 tokens forces several packed rows (and several padded micro-batches).
    learner = make_learner(tiny_model_dir, "model.dtype=float32", "learner.micro_batch_tokens=40",
                           f"objective.name={objective}", "learner.layout=packed")
    update, model = learner.updater, learner.policy.net
    batch = _train_batch(model.config.vocab_size, 8, seed=5)
    update.optimizer.zero_grad(set_to_none=True)
    stats = update.accumulate_gradients(batch)
    assert stats["micro_batches"] > 1
    assert stats["processed_tokens"] == stats["tokens"]  # no padding
    packed = _grads(model)

    # Reference: every sequence on its own (no padding, no packing), one loss over the batch.
    update.optimizer.zero_grad(set_to_none=True)
    model.train()
    logp, _ = _reference(model, batch.prompt_ids, batch.response_ids)
    T = logp.shape[1]
    mask = right_align([[1.0] * len(r) for r in batch.response_ids], T).bool()
    adv = right_align(batch.advantages, T)
    norm = LossNorm(batch.num_tokens, batch.num_seqs, batch.max_len)
    loss, _ = learner.objective.loss(logp, logp.detach(), adv, mask, norm=norm)
    loss.backward()
    reference = _grads(model)

    update.micro_batches.layout = "padded"
    update.optimizer.zero_grad(set_to_none=True)
    update.accumulate_gradients(batch)
    padded = _grads(model)

    assert packed.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(packed[name], reference[name], atol=1e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(padded[name], reference[name], atol=1e-5, rtol=1e-4, msg=name)
    assert stats["loss"] == pytest.approx(float(loss.detach()), abs=1e-5)


# --- shared_prompt: each distinct prompt runs once, its KV cache serves its samples ----------

def _grouped_batch(vocab: int, groups: int, group_size: int, seed: int, prompt_len=(1, 12)):
    """GRPO-shaped data: `group_size` responses (one of them empty) per prompt, consecutive."""
    rng = random.Random(seed)
    prompts, responses = [], []
    for _ in range(groups):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(*prompt_len))]
        for j in range(group_size):
            prompts.append(prompt)
            responses.append([] if j == 1 else [rng.randrange(vocab) for _ in range(rng.randint(1, 20))])
    return prompts, responses


def _shared(model, prompts, responses, rows=None):
    """Pass 1 over the distinct prompts, pass 2 over all responses (in one micro-batch)."""
    distinct = list(dict.fromkeys(tuple(p) for p in prompts))
    shared = SharedPrompts(model, [list(p) for p in distinct], pad_id=0)
    rows = [distinct.index(tuple(p)) for p in prompts] if rows is None else rows
    return shared, make_response_micro_batch(shared, rows, responses, pad_id=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_shared_prompt_logprobs_equal_per_sequence(tiny_model, temperature):
    prompts, responses = _grouped_batch(tiny_model.config.vocab_size, 3, 4, seed=2)
    with torch.no_grad():
        ref_logp, ref_ent = _reference(tiny_model, prompts, responses, temperature)
        shared, mb = _shared(tiny_model, prompts, responses)
        logp, ent = response_logprobs(tiny_model, mb, temperature, with_entropy=True)
    assert shared.first_logits.shape[0] == 3 and mb.prompt_rows.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    T = ref_logp.shape[1]
    assert mb.num_processed_tokens == 12 * (T - 1)
    assert shared.num_real_tokens == sum(len(p) for p in prompts[::4])  # each prompt once
    assert torch.equal(mb.response_mask, ref_logp != 0)
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=0)


def test_shared_prompt_without_repeats_and_one_token_responses(tiny_model):
    """Every prompt distinct (no sharing) and T = 1 (no second pass) still give the reference;
    so do responses listed in any order against the prompt rows."""
    prompts, responses = _random_batch(tiny_model.config.vocab_size, 5, seed=3, empty_response=False)
    one_token = [r[:1] for r in responses]
    with torch.no_grad():
        for resp in (responses, one_token):
            _, mb = _shared(tiny_model, prompts, resp)
            logp, _ = response_logprobs(tiny_model, mb)
            torch.testing.assert_close(logp, _reference(tiny_model, prompts, resp)[0], atol=1e-5, rtol=0)
        order = [3, 0, 4, 1, 2]
        shared, _ = _shared(tiny_model, prompts, responses)
        mb = make_response_micro_batch(shared, order, [responses[i] for i in order], pad_id=0)
        logp, _ = response_logprobs(tiny_model, mb)
        expected = _reference(tiny_model, [prompts[i] for i in order], [responses[i] for i in order])[0]
        torch.testing.assert_close(logp, expected, atol=1e-5, rtol=0)


def test_shared_prompt_rejects_empty_prompt(tiny_model):
    with pytest.raises(ValueError, match="non-empty prompt"):
        SharedPrompts(tiny_model, [[]], 0)


def test_shared_prompt_one_backward_through_pass_1_equals_per_sequence_gradient(tiny_model_dir):
    """Two micro-batches over one pass 1: gradients gathered on the cache leaves, sent through
    pass 1 once, equal the gradient of the same loss over sequences run one by one."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    prompts, responses = _grouped_batch(model.config.vocab_size, 2, 3, seed=9)
    weights = torch.randn(len(prompts), generator=torch.Generator().manual_seed(0))  # per sequence
    shared, _ = _shared(model, prompts, responses)
    rows = [0, 0, 0, 1, 1, 1]
    for part in ([0, 3, 4], [1, 2, 5]):
        mb = make_response_micro_batch(shared, [rows[i] for i in part], [responses[i] for i in part], 0)
        logp, _ = response_logprobs(model, mb)
        (logp.sum(-1) * weights[part]).sum().backward()
    shared.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logp = _reference(model, prompts, responses)[0]
    (logp.sum(-1) * weights).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("objective", ["grpo", "gspo"])
def test_learner_shared_prompt_gradient_equals_padded(tiny_model_dir, make_learner, objective):
    from rl.learner import TrainBatch

    # prompts of 20-30 tokens, responses of <= 20: a group costs <= 30 + 4 * 20 = 110 tokens,
    # so a budget of 150 holds one group per micro-batch
    learner = make_learner(tiny_model_dir, "model.dtype=float32", "learner.micro_batch_tokens=150",
                           f"objective.name={objective}", "learner.layout=shared_prompt")
    update, model = learner.updater, learner.policy.net
    prompts, responses = _grouped_batch(model.config.vocab_size, 4, 4, seed=7, prompt_len=(20, 30))
    gen = torch.Generator().manual_seed(7)
    adv = [torch.randn(len(r), generator=gen).tolist() for r in responses]
    roll = [(-torch.rand(len(r), generator=gen)).tolist() for r in responses]
    batch = TrainBatch(prompts, responses, adv, roll, float(sum(map(len, responses))),
                       float(sum(bool(r) for r in responses)), float(max(map(len, responses))))
    update.optimizer.zero_grad(set_to_none=True)
    shared_stats = update.accumulate_gradients(batch)
    shared = _grads(model)
    assert shared_stats["micro_batches"] > 1
    update.micro_batches.layout = "padded"
    update.optimizer.zero_grad(set_to_none=True)
    padded_stats = update.accumulate_gradients(batch)
    padded = _grads(model)
    assert shared_stats["processed_tokens"] < padded_stats["processed_tokens"]
    assert shared.keys() == padded.keys()
    for name in padded:
        torch.testing.assert_close(shared[name], padded[name], atol=1e-5, rtol=1e-4, msg=name)
    assert shared_stats["loss"] == pytest.approx(padded_stats["loss"], abs=1e-5)


def test_shared_prompt_refuses_gradient_checkpointing():
    from rl.config import load_config
    from rl.errors import ConfigError

    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        load_config(None, ["learner.layout=shared_prompt", "learner.gradient_checkpointing=true"])
    auto = load_config(None, ["learner.gradient_checkpointing=true"]).learner
    assert auto.resolved_layout == "padded"  # auto picks a layout that works without the KV cache


def test_shared_prompt_full_logits_fallback_equals_head_on_real_positions(tiny_model, monkeypatch):
    """Models that scale or soft-cap logits take the full-logits path; both paths agree here."""
    import rl.logprobs as lp

    assert lp._decoder_and_head(tiny_model) is not None  # the tiny Qwen2 takes the fast path
    prompts, responses = _grouped_batch(tiny_model.config.vocab_size, 2, 3, seed=4)
    with torch.no_grad():
        _, mb = _shared(tiny_model, prompts, responses)
        fast, fast_ent = response_logprobs(tiny_model, mb, with_entropy=True)
        monkeypatch.setattr(lp, "_decoder_and_head", lambda model: None)
        full, full_ent = response_logprobs(tiny_model, mb, with_entropy=True)
    torch.testing.assert_close(fast, full, atol=1e-6, rtol=0)
    torch.testing.assert_close(fast_ent, full_ent, atol=1e-6, rtol=0)
    torch.testing.assert_close(fast, _reference(tiny_model, prompts, responses)[0], atol=1e-5, rtol=0)


def test_decoder_and_head_refuses_soft_capped_logits(tiny_model, monkeypatch):
    import rl.logprobs as lp

    monkeypatch.setattr(tiny_model.config, "final_logit_softcapping", 30.0, raising=False)
    assert lp._decoder_and_head(tiny_model) is None


# --- the chunked head + log-softmax (the default path) equals the full-logits one -----------

import rl.logprobs as lp  # noqa: E402


def _head_case(K=37, H=24, V=301, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(K, H, generator=gen).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) * 0.3).requires_grad_()
    b = (torch.randn(V, generator=gen) * 0.1).requires_grad_() if bias else None
    targets = torch.randint(0, V, (K,), generator=gen)
    upstream = torch.randn(K, generator=gen)  # a loss that weighs each token differently
    return hidden, weight, b, targets, upstream


def _grads_of(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


# chunk sizes that do not divide K = 37 or V = 301, one chunk only, one row / column per chunk
CHUNKS = [(5, 64), (37, 301), (1, 1), (16, 300), (None, None)]


@pytest.mark.parametrize("chunk_tokens,chunk_vocab", CHUNKS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("backward", ["stored", "recompute"])
def test_chunked_head_equals_full_logits_fp32(chunk_tokens, chunk_vocab, temperature, backward):
    hidden, weight, bias, targets, up = _head_case()
    ref_lp, ref_ent = lp._token_logprobs(torch.nn.functional.linear(hidden, weight, bias), targets,
                                         temperature, with_entropy=True)
    ref_grads = _grads_of((ref_lp * up).sum(), [hidden, weight, bias])
    got_lp, got_ent = lp.chunked_head_logprobs(hidden, weight, targets, temperature, with_entropy=True,
                                               bias=bias, chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab,
                                               backward=backward)
    got_grads = _grads_of((got_lp * up).sum(), [hidden, weight, bias])
    assert got_lp.dtype == torch.float32 and not got_ent.requires_grad
    torch.testing.assert_close(got_lp, ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_ent, ref_ent, atol=1e-5, rtol=0)
    for name, g, r in zip(("hidden", "weight", "bias"), got_grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("backward", ["stored", "recompute"])
def test_chunked_head_bf16_autocast_within_tolerance(backward):
    """Under bf16 autocast both paths take bf16 logits (fp32 accumulation) and float32
    softmax statistics: log-probs and entropies agree to 1e-5 (same bf16 logits; only the
    order of the float32 sums differs). Gradients: both round (softmax - onehot) to bf16 for
    the matmuls; the chunked path also rounds g * hidden (stored) or sums chunk products
    (recompute): within 1e-2 of the largest entry (5e-3 seen)."""
    hidden, weight, bias, targets, up = _head_case(K=70, H=64, V=1000, bias=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_lp, ref_ent = lp._token_logprobs(torch.nn.functional.linear(hidden, weight), targets, 0.7, True)
        got_lp, got_ent = lp.chunked_head_logprobs(hidden, weight, targets, 0.7, True,
                                                   chunk_tokens=16, chunk_vocab=300, backward=backward)
    ref_grads = _grads_of((ref_lp * up).sum(), [hidden, weight])
    got_grads = _grads_of((got_lp * up).sum(), [hidden, weight])
    torch.testing.assert_close(got_lp, ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_ent, ref_ent, atol=1e-5, rtol=0)
    for g, r in zip(got_grads, ref_grads):
        assert g.dtype == r.dtype == torch.float32
        assert float((g - r).abs().max()) <= 1e-2 * float(r.abs().max())


def test_chunked_head_frozen_weight_and_no_grad():
    """No gradient wanted for the head (LoRA: a frozen base) or none at all (scoring)."""
    hidden, weight, _, targets, up = _head_case(bias=False)
    weight = weight.detach()
    logp, ent = lp.chunked_head_logprobs(hidden, weight, targets, chunk_tokens=8)
    assert ent is None
    (g,) = _grads_of((logp * up).sum(), [hidden])
    ref = _grads_of((lp._token_logprobs(hidden @ weight.t(), targets, 1.0, False)[0] * up).sum(), [hidden])[0]
    torch.testing.assert_close(g, ref, atol=1e-5, rtol=0)
    with torch.no_grad():
        logp2, _ = lp.chunked_head_logprobs(hidden, weight, targets)
    assert not logp2.requires_grad
    torch.testing.assert_close(logp2, logp.detach(), atol=0, rtol=0)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-5)])
def test_chunked_logits_equals_full_logits(dtype, atol):
    """Logits that exist already (soft-capped models, FSDP): same values; the gradient comes
    back in the logits' dtype (bf16: the full path rounds the same float32 gradient)."""
    hidden, weight, bias, targets, up = _head_case()
    logits = torch.nn.functional.linear(hidden, weight, bias).detach().to(dtype).requires_grad_()
    ref_lp, ref_ent = lp._token_logprobs(logits, targets, 0.7, True)
    (ref_g,) = _grads_of((ref_lp * up).sum(), [logits])
    got_lp, got_ent = lp.chunked_logits_logprobs(logits, targets, 0.7, True, chunk_tokens=6)
    (got_g,) = _grads_of((got_lp * up).sum(), [logits])
    torch.testing.assert_close(got_lp, ref_lp, atol=atol, rtol=0)
    torch.testing.assert_close(got_ent, ref_ent, atol=atol, rtol=0)
    assert got_g.dtype == dtype
    torch.testing.assert_close(got_g.float(), ref_g.float(), atol=1e-5 if dtype == torch.float32 else 1e-2,
                               rtol=0 if dtype == torch.float32 else 1e-2)


def test_chunked_float32_logits_are_not_modified():
    logits = torch.randn(9, 50)
    before = logits.clone()
    lp.chunked_logits_logprobs(logits, torch.zeros(9, dtype=torch.long), 1.0, True, chunk_tokens=4)
    assert torch.equal(logits, before)


def _layout_batches(model, seed=11):
    """One micro-batch per layout over the same GRPO-shaped sequences (and shared's pass 1)."""
    prompts, responses = _grouped_batch(model.config.vocab_size, 3, 3, seed=seed)
    shared, smb = _shared(model, prompts, responses)
    return {"padded": make_micro_batch(prompts, responses, 0),
            "packed": make_packed_micro_batch(prompts, responses, 0),
            "shared_prompt": smb}, shared


def _run_layout(model, mb, shared, temperature, chunked, weights):
    model.zero_grad(set_to_none=True)
    logp, ent = response_logprobs(model, mb, temperature, with_entropy=True, chunked=chunked)
    (logp * weights[:, :logp.shape[1]]).sum().backward()
    if shared is not None:
        shared.backward()
    return logp.detach(), ent, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("layout", ["padded", "packed", "shared_prompt"])
@pytest.mark.parametrize("temperature,backward", [(1.0, "auto"), (0.7, "auto"), (0.7, "stored")])
def test_response_logprobs_chunked_equals_full_logits_fp32(tiny_model_dir, monkeypatch, layout, temperature,
                                                           backward):
    """Every layout, float32: the chunked path's log-probs, entropies and parameter gradients
    (tied embedding/head included) equal the full-logits path's. Chunks of 7 tokens forward and
    (recompute, the float32 default) of about 90 vocabulary columns backward: neither divides
    the token count nor V."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    monkeypatch.setattr(lp, "CHUNK_ELEMENTS", 7 * model.config.vocab_size)
    monkeypatch.setattr(lp, "MIN_CHUNK", 1)
    monkeypatch.setattr(lp, "HEAD_BACKWARD", backward)
    weights = torch.randn(20, 40, generator=torch.Generator().manual_seed(1))
    results = []
    for chunked in (False, True):
        mbs, shared = _layout_batches(model)
        results.append(_run_layout(model, mbs[layout], shared if layout == "shared_prompt" else None,
                                   temperature, chunked, weights[:mbs[layout].response_mask.shape[0]]))
    (ref_lp, ref_ent, ref_g), (lp_, ent, g) = results
    torch.testing.assert_close(lp_, ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=0)
    assert g.keys() == ref_g.keys() and "model.embed_tokens.weight" in g
    for name in ref_g:
        torch.testing.assert_close(g[name], ref_g[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("layout", ["padded", "shared_prompt"])
def test_response_logprobs_chunked_bf16_autocast(tiny_model_dir, layout):  # HEAD_BACKWARD "auto": stored
    """bf16 autocast: the same bf16 logits on both paths, so log-probs and entropies agree to
    1e-5 (they came out bit-identical here); parameter gradients, after the bf16 backward
    through the layers, to 3e-2 of each tensor's largest entry (1.5e-2 seen)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    weights = torch.randn(20, 40, generator=torch.Generator().manual_seed(2))
    results = []
    for chunked in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):  # pass 1 too, as in the learner
            mbs, shared = _layout_batches(model, seed=12)
            results.append(_run_layout(model, mbs[layout], shared if layout == "shared_prompt" else None,
                                       0.7, chunked, weights[:mbs[layout].response_mask.shape[0]]))
    (ref_lp, ref_ent, ref_g), (lp_, ent, g) = results
    torch.testing.assert_close(lp_, ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=0)
    for name in ref_g:
        scale = float(ref_g[name].abs().max())
        assert float((g[name] - ref_g[name]).abs().max()) <= 3e-2 * scale, name


@pytest.mark.parametrize("route", ["full_logits_fallback", "head_not_linear"])
def test_response_logprobs_chunked_fallbacks(tiny_model, monkeypatch, route):
    """Soft-capped models (no decoder/head split) and heads that are not a plain Linear (LoRA
    on lm_head) take the chunked log-softmax over logits: same log-probs."""
    with torch.no_grad():
        mbs, _ = _layout_batches(tiny_model, seed=4)
        expected = {k: response_logprobs(tiny_model, mb, 0.7, True, chunked=False) for k, mb in mbs.items()}
        if route == "full_logits_fallback":
            monkeypatch.setattr(lp, "_decoder_and_head", lambda model: None)
        else:
            monkeypatch.setattr(lp, "_linear_params", lambda head: None)
        for k, mb in mbs.items():
            got = response_logprobs(tiny_model, mb, 0.7, True)
            torch.testing.assert_close(got[0], expected[k][0], atol=1e-5, rtol=0, msg=k)
            torch.testing.assert_close(got[1], expected[k][1], atol=1e-5, rtol=0, msg=k)


def test_response_logprobs_chunked_all_responses_empty(tiny_model):
    mb = make_micro_batch([[1, 2], [3]], [[], []], 0)
    logp, ent = response_logprobs(tiny_model, mb, with_entropy=True)
    assert logp.shape == (2, 1) and not logp.any() and not ent.any()
    logp.sum().backward()  # attached to the graph, zero gradient
    tiny_model.zero_grad(set_to_none=True)


def test_chunked_is_the_default():
    assert lp.USE_CHUNKED is True and lp.HEAD_BACKWARD == "auto"
    with pytest.raises(ValueError, match="stored, recompute or auto"):
        lp.chunked_head_logprobs(torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(2, dtype=torch.long),
                                 backward="keep")
