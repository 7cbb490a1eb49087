"""The rollout engine's KV cache sized from rollout.scheduler.kv_budget_tokens (a real vLLM
engine on the tiny model): allocated blocks, the bytes behind them, and a rollout that stays
inside them."""

import pytest

from rollout.records import SampleRequest

pytestmark = pytest.mark.slow

B, G, MAX_NEW = 4, 8, 24


def kv_cache_bytes(worker) -> int:
    """Bytes of the KV cache tensors the engine's worker allocated (collective_rpc target)."""
    total = 0
    for t in worker.model_runner.kv_caches:
        for x in (t if isinstance(t, (list, tuple)) else [t]):
            total += x.numel() * x.element_size()
    return total


def build(model_dir, *overrides):
    from rl.config import load_config
    from rollout.worker import RolloutWorker

    c = load_config(None, ["data.max_prompt_tokens=64", f"rollout.max_new_tokens={MAX_NEW}",
                           f"rollout.group_size={G}", f"data.prompts_per_step={B}", *overrides])
    opts = c.rollout.scheduler.worker_options(c.rollout.group_size)  # as rl.actors passes them
    w = RolloutWorker(model_dir, dtype="float32", max_model_len=64 + MAX_NEW, gpu_memory_utilization=0.1,
                      seed=0, **opts)
    return w, opts


def requests(tok):
    out = []
    for i, q in enumerate(["What is 3 + 4?", "What is 12 - 5?", "Give the sum of 8 and 9.", "Compute 6 times 7."]):
        text = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        out.append(SampleRequest(i, tok(text, add_special_tokens=False)["input_ids"]))
    return out


def test_engine_allocates_the_budget_and_no_more(tiny_model_dir):
    from rollout.worker import CPU_BUDGET_BLOCK_SIZE

    sizes = {}
    for budget in (1000, 2000):
        w, opts = build(tiny_model_dir, f"rollout.scheduler.kv_budget_tokens={budget}",
                        "rollout.scheduler.policy=length_aware")
        try:
            assert opts["engine_kv_tokens"] == opts["kv_budget_tokens"] == budget
            block = w.probe.block_size
            assert block == CPU_BUDGET_BLOCK_SIZE
            # whole blocks within the budget + vLLM's null block: <= budget + one block allocated
            assert w.probe.usable_blocks == budget // block
            assert w.cache_tokens <= budget < w.cache_tokens + block
            assert w.engine_kv_tokens == (budget // block + 1) * block <= budget + block
            sizes[budget] = (w.probe.usable_blocks + 1, w.engine.collective_rpc(kv_cache_bytes)[0])
            res = w.generate(requests(w.tokenizer), group_size=G, max_new_tokens=MAX_NEW, temperature=1.0)
            x = res.stats.extra
            assert len(res.samples) == B * G
            assert x["engine_kv_tokens"] == w.engine_kv_tokens and x["kv_budget_tokens"] == budget
            assert 0 < x["engine_peak_kv_tokens"] <= w.cache_tokens <= budget
            assert x["kv_lower_bound"] >= x["lower_bound"] > 0
            assert x["predictor_mae"] is not None and x["predictor_mae"] >= 0
        finally:
            w.shutdown()
    # the tensors behind the blocks: bytes proportional to the blocks allocated (not to RAM)
    (n1, b1), (n2, b2) = sizes[1000], sizes[2000]
    assert b1 // n1 == b2 // n2 and b1 % n1 == 0 and b2 > b1


def test_auto_budget_sizes_each_engine_from_the_demand(tiny_model_dir):
    # 0.25 x 4 prompts x 8 samples x (64 + 24) tokens = 704
    w, opts = build(tiny_model_dir, "rollout.scheduler.kv_budget_tokens=auto",
                    "rollout.scheduler.kv_budget_fraction=0.25", "rollout.scheduler.policy=continuous",
                    "rollout.scheduler.micro_group_size=4")
    try:
        assert opts["kv_budget_tokens"] == 704 and opts["slots"] == 4
        assert w.engine_kv_tokens <= 704 + w.probe.block_size and w.cache_tokens <= 704
        res = w.generate(requests(w.tokenizer), group_size=G, max_new_tokens=MAX_NEW, temperature=1.0)
        assert len(res.samples) == B * G and res.stats.peak_running <= 4
        assert res.stats.extra["engine_peak_kv_tokens"] <= 704
    finally:
        w.shutdown()


def test_predicted_preemption_makes_vllm_preempt_the_longest_predicted(tiny_model_dir):
    """rollout.scheduler.preemption: predicted_longest builds the engine with vLLM's priority
    scheduling and adds each request with its predicted length as priority, so every victim
    vLLM picks is predicted at least as long as anything it leaves running."""
    from vllm.v1.core.sched.request_queue import SchedulingPolicy

    from rollout.worker import RolloutWorker

    # the policy may fill far more than the engine holds (admit all 32 at once): vLLM must preempt
    w = RolloutWorker(tiny_model_dir, dtype="float32", max_model_len=64 + MAX_NEW, gpu_memory_utilization=0.1,
                      seed=0, policy="length_aware", kv_budget_tokens=10**5, engine_kv_tokens=320,
                      preemption="predicted_longest")
    try:
        scheduler = w.probe.scheduler
        assert scheduler.policy == SchedulingPolicy.PRIORITY
        victims = []
        counted = scheduler._preempt_request  # the probe's counter, wrapping vLLM's own

        def record(request, *args, **kwargs):
            # vLLM took the victim out of `running` just before this call
            victims.append((request.priority, max((r.priority for r in scheduler.running), default=None)))
            return counted(request, *args, **kwargs)

        scheduler._preempt_request = record
        res = w.generate(requests(w.tokenizer), group_size=G, max_new_tokens=MAX_NEW, temperature=1.0)
        assert len(res.samples) == B * G
        assert res.stats.preemptions == len(victims) > 0
        assert all(left is None or p >= left for p, left in victims), victims
        # back to vLLM's own choice between rollouts, in the same engine
        w.set_policy("length_aware", {}, kv_budget_tokens=10**5, preemption="lifo")
        assert scheduler.policy == SchedulingPolicy.FCFS and w.preemption == "lifo"
        res = w.generate(requests(w.tokenizer), group_size=G, max_new_tokens=MAX_NEW, temperature=1.0)
        assert len(res.samples) == B * G
    finally:
        w.shutdown()
