"""RolloutWorker on a real vLLM engine (tiny random model): every policy, one engine.

The engine's KV cache is made deliberately small (24 blocks of 32 tokens = 768 tokens) so that
full_group, which admits all B x G = 32 sequences of ~50 tokens at once, cannot fit and vLLM
must preempt, while the bounded policies fit. One engine serves the whole module.
"""

import collections

import pytest

from rollout.records import SampleRequest

pytestmark = pytest.mark.slow

B, G, MAX_NEW = 4, 8, 24
BLOCK, BLOCKS = 32, 24
CACHE = (BLOCKS - 1) * BLOCK  # one block is vLLM's null block
POLICIES = ("full_group", "naive_micro", "continuous", "length_aware")
# bounded policies: at most 8 sequences of <= 24 + ~25 tokens: 2 blocks each, 16 <= 23 blocks
BOUNDED = {"slots": 8, "kv_budget_tokens": 8 * 50}


@pytest.fixture(scope="module")
def worker(tiny_model_dir):
    from rollout.worker import RolloutWorker

    w = RolloutWorker(tiny_model_dir, dtype="float32", max_model_len=128,
                      gpu_memory_utilization=0.1, seed=0,
                      engine_kwargs={"block_size": BLOCK, "num_gpu_blocks_override": BLOCKS,
                                     "max_num_seqs": 64})
    w.record_timeline = True
    return w


@pytest.fixture(scope="module")
def requests(worker):
    tok = worker.tokenizer
    out = []
    for i, q in enumerate(["What is 3 + 4?", "What is 12 - 5?", "Give the sum of 8 and 9.",
                           "Please compute 6 times 7."]):
        text = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                       add_generation_prompt=True)
        out.append(SampleRequest(10 + i, tok(text, add_special_tokens=False)["input_ids"]))
    assert max(len(r.prompt_ids) for r in out) + MAX_NEW <= 2 * BLOCK
    return out


def set_policy(worker, name):
    kw = {"micro_group_size": 4} if name == "naive_micro" else {}
    if name == "length_aware":
        # reserve the cap for every sequence: a plan that can never overrun its budget
        kw = {"predictor": "constant", "fraction": 1.0}
    bounds = {} if name == "full_group" else BOUNDED
    worker.set_policy(name, kw, **bounds)


@pytest.fixture(scope="module")
def greedy(worker, requests):
    """policy -> RolloutResult of a greedy rollout (temperature 0)."""
    out = {}
    for name in POLICIES:
        set_policy(worker, name)
        worker.engine.reset_prefix_cache()
        out[name] = worker.generate(requests, group_size=G, max_new_tokens=MAX_NEW,
                                    temperature=0.0)
    return out


def test_every_sample_comes_back_exactly_once_with_its_group(worker, requests):
    worker.set_policy("length_aware", {"predictor": "token_conditioned"}, **BOUNDED)
    res = worker.generate(requests, group_size=G, max_new_tokens=MAX_NEW, temperature=1.0)
    keys = [(s.group_id, s.sample_index) for s in res.samples]
    assert sorted(keys) == sorted((r.group_id, k) for r in requests for k in range(G))
    prompt_of = {r.group_id: r.prompt_ids for r in requests}
    for s in res.samples:
        assert s.prompt_ids == prompt_of[s.group_id]
        assert 1 <= len(s.response_ids) <= MAX_NEW
        assert len(s.logprobs) == len(s.response_ids)
    assert res.stats.generated_tokens == sum(len(s.response_ids) for s in res.samples)
    # the learned predictor saw every finished sample and persists into the next step
    assert worker.policy.predictor.n_obs == B * G


def test_greedy_completions_are_the_same_under_every_policy(greedy):
    def completions(result):
        per_group = collections.defaultdict(list)
        for s in result.samples:
            per_group[s.group_id].append(tuple(s.response_ids))
        return {g: sorted(v) for g, v in per_group.items()}

    reference = completions(greedy["full_group"])
    assert len(reference) == B and all(len(v) == G for v in reference.values())
    for name in POLICIES[1:]:
        assert completions(greedy[name]) == reference, name


def test_bounded_policies_stay_within_slots_and_budget(greedy):
    for name in POLICIES[1:]:
        st = greedy[name].stats
        assert st.peak_running <= BOUNDED["slots"], name
        assert st.extra["engine_peak_running"] <= BOUNDED["slots"], name
        assert st.extra["engine_peak_kv_tokens"] <= CACHE, name
        assert st.preemptions == 0, name
    st = greedy["length_aware"].stats
    assert st.peak_kv_tokens <= BOUNDED["kv_budget_tokens"]
    assert max(t[1] for t in st.extra["timeline"]) == st.peak_kv_tokens


def test_full_group_overflows_the_small_cache_and_preemptions_are_counted(greedy):
    st = greedy["full_group"].stats
    assert st.peak_running == B * G  # everything admitted at once
    assert st.extra["engine_peak_kv_tokens"] <= CACHE  # vLLM kept it in the cache ...
    assert st.preemptions > 0  # ... by preempting, and the counter saw it
    # and the bounded policies need fewer engine blocks at their peak than full_group
    assert greedy["continuous"].stats.extra["engine_peak_kv_tokens"] < st.extra["engine_peak_kv_tokens"]
