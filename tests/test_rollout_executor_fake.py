"""The step loop of rollout/executor.py on a fake engine: completeness, limits, exact counts.

The fake engine decodes like vLLM seen from outside: `step()` gives every running request one
token (and at most `engine_slots` run; the rest wait in its queue, as in vLLM's scheduler) and
returns a cumulative output per request that advanced. Lengths are fixed per request, so the
loop can be checked against the decode-step simulator.
"""

from types import SimpleNamespace

import pytest

from rollout.executor import run_rollout
from scheduling import OracleLengthPredictor, Seq, make_policy, simulate


class FakeEngine:
    def __init__(self, lengths: dict[str, int], engine_slots: int = 10**9):
        self.lengths = lengths
        self.engine_slots = engine_slots
        self.queue: list[str] = []
        self.tokens: dict[str, list[int]] = {}
        self.added: list[str] = []
        self.priorities: dict[str, int] = {}

    def add_request(self, rid, prompt, params, priority=0):
        assert rid not in self.tokens, "request added twice"
        self.added.append(rid)
        self.priorities[rid] = priority
        self.queue.append(rid)
        self.tokens[rid] = []

    def step(self):
        outs = []
        for rid in list(self.queue[: self.engine_slots]):
            toks = self.tokens[rid]
            toks.append(len(toks))
            done = len(toks) >= self.lengths[rid]
            if done:
                self.queue.remove(rid)
            outs.append(SimpleNamespace(request_id=rid, finished=done,
                                        outputs=[SimpleNamespace(token_ids=list(toks))]))
        return outs


def make_work(groups=6, g=4, prompt=5, cap=40):
    lengths, seqs = {}, []
    for b in range(groups):
        for k in range(g):
            rid = f"r{b}_{k}"
            lengths[rid] = 1 + (7 * b + 13 * k * k) % cap
            seqs.append(Seq(rid, b, prompt, cap))
    return seqs, lengths


@pytest.mark.parametrize("name", ["full_group", "naive_micro", "continuous", "length_aware"])
def test_every_sample_comes_back_once_within_the_limits(name):
    seqs, lengths = make_work()
    kw = {"predictor": OracleLengthPredictor(lengths)} if name == "length_aware" else {}
    if name == "naive_micro":
        kw["micro_group_size"] = 4
    engine = FakeEngine(lengths)
    prompts = {s.seq_id: [1] * s.prompt_tokens for s in seqs}
    finished, stats = run_rollout(engine, make_policy(name, **kw), seqs, prompts, None,
                                  kv_budget_tokens=150, slots=8)
    assert sorted(engine.added) == sorted(lengths)  # each admitted exactly once
    assert {rid: len(c.token_ids) for rid, c in finished.items()} == lengths
    assert stats.generated_tokens == sum(lengths.values())
    assert stats.extra["lower_bound"] == max(max(lengths.values()), -(-sum(lengths.values()) // 8))
    if name != "full_group":
        assert stats.peak_running <= 8
    else:
        assert stats.peak_running == len(seqs)
    if name == "length_aware":  # the oracle plan never overruns its KV reservation
        assert stats.peak_kv_tokens <= 150


@pytest.mark.parametrize("name", ["naive_micro", "continuous", "length_aware"])
def test_decode_steps_equal_the_simulator(name):
    """Without engine-side queueing, the real loop and the simulator give the same schedule."""
    seqs, lengths = make_work(groups=5, g=4)
    trace = [(s.group_id, s.prompt_tokens, lengths[s.seq_id]) for s in seqs]

    def policy(oracle_lengths):
        if name == "length_aware":
            return make_policy(name, predictor=OracleLengthPredictor(oracle_lengths))
        return make_policy(name)

    sim = simulate(policy({i: n for i, (_, _, n) in enumerate(trace)}), trace, slots=6,
                   kv_budget_tokens=200)
    _, stats = run_rollout(FakeEngine(lengths), policy(lengths), seqs,
                           {s.seq_id: [] for s in seqs}, None, kv_budget_tokens=200, slots=6)
    assert stats.decode_steps == sim.decode_steps
    assert stats.peak_kv_tokens == sim.peak_kv_tokens


def test_generated_counts_come_from_the_engine_not_from_steps():
    """full_group admits 12 but the engine runs 4 at a time: queued ones have generated 0, so
    the policy and the KV accounting see what really exists."""
    seqs, lengths = make_work(groups=3, g=4, prompt=0)
    seen = []

    class Spy(type(make_policy("full_group"))):
        def on_finished(self, seq, length):
            seen.append((seq.seq_id, length))

    _, stats = run_rollout(FakeEngine(lengths, engine_slots=4), Spy(), seqs,
                           {s.seq_id: [] for s in seqs}, None, kv_budget_tokens=10**6, slots=64)
    assert dict(seen) == lengths
    # prompt 0: own KV = generated tokens of the <= 4 sequences the engine runs at once
    assert stats.peak_kv_tokens <= 4 * max(lengths.values())


@pytest.mark.parametrize("preemption, sign", [("lifo", 0), ("predicted_longest", 1), ("predicted_shortest", -1)])
def test_requests_carry_their_predicted_length_as_vllm_priority(preemption, sign):
    seqs, lengths = make_work()
    engine = FakeEngine(lengths)
    policy = make_policy("length_aware", predictor=OracleLengthPredictor(lengths))
    finished, _ = run_rollout(engine, policy, seqs, {s.seq_id: [1] * 5 for s in seqs}, None,
                              kv_budget_tokens=10**6, slots=8, preemption=preemption)
    assert len(finished) == len(seqs)
    assert engine.priorities == {rid: sign * n for rid, n in lengths.items()}


def test_predicted_preemption_needs_a_length_predictor():
    seqs, lengths = make_work()
    with pytest.raises(ValueError, match="needs a policy with a length predictor"):
        run_rollout(FakeEngine(lengths), make_policy("continuous"), seqs, {s.seq_id: [1] for s in seqs},
                    None, kv_budget_tokens=10**6, slots=8, preemption="predicted_longest")


def test_a_policy_that_admits_a_running_id_is_an_error():
    seqs, lengths = make_work(groups=1, g=2)

    class Bad(type(make_policy("continuous"))):
        def plan(self, pending, running, kv, slots):
            return [seqs[0].seq_id]

    with pytest.raises(RuntimeError, match="admitted"):
        run_rollout(FakeEngine(lengths), Bad(), seqs, {s.seq_id: [] for s in seqs}, None, 100, 4)


# --- micro groups: rounds of g, through the training config's translation ----------------------

def _rounds(policy_name: str, group_size: int, g: int, lengths_of, groups: int = 1):
    """(admission batches, stats) of one rollout of `groups` x `group_size` samples under the
    options rl.train gives the workers (rl.actors.scheduler_options) for
    rollout.scheduler.{policy, micro_group_size}."""
    from rl.config import load_config

    c = load_config(None, [f"rollout.group_size={group_size}", f"rollout.scheduler.policy={policy_name}",
                           f"rollout.scheduler.micro_group_size={g}"])
    opts = c.rollout.scheduler.worker_options(c.rollout.group_size)  # as rl.actors passes them
    kw = dict(opts["policy_kwargs"])
    lengths, seqs = {}, []
    for b in range(groups):
        for k in range(group_size):
            rid = f"r{b}_{k}"
            lengths[rid] = lengths_of(b, k)
            seqs.append(Seq(rid, b, 5, 64))
    if policy_name == "length_aware":
        kw["predictor"] = OracleLengthPredictor(lengths)
    policy = make_policy(opts["policy"], **kw)
    batches = []
    plan = policy.plan

    def recorded(*args):
        admit = plan(*args)
        if admit:
            batches.append(list(admit))
        return admit

    policy.plan = recorded
    _, stats = run_rollout(FakeEngine(lengths), policy, seqs, {s.seq_id: [] for s in seqs}, None,
                           kv_budget_tokens=10**6, slots=opts["slots"])
    return batches, stats


@pytest.mark.parametrize("name", ["naive_micro", "continuous", "length_aware"])
def test_micro_group_size_4_of_16_decodes_in_4_rounds(name):
    batches, stats = _rounds(name, 16, 4, lambda b, k: 10)
    assert [len(b) for b in batches] == [4, 4, 4, 4]
    assert stats.peak_running == 4 and stats.decode_steps == 40


def test_naive_micro_rounds_wait_for_the_slowest_sample():
    # lengths 1..16: a round ends with its longest sample; the next round starts only then
    batches, stats = _rounds("naive_micro", 16, 4, lambda b, k: k + 1)
    assert [len(b) for b in batches] == [4, 4, 4, 4]
    assert stats.decode_steps == 4 + 8 + 12 + 16


def test_continuous_interleaves_rounds_across_groups():
    # 2 groups of 6, g = 4: group 0's second micro-group (2 samples) shares its round with group 1
    batches, stats = _rounds("continuous", 6, 4, lambda b, k: 10, groups=2)
    assert [len(b) for b in batches] == [4, 4, 4]
    assert {s.split("_")[0] for s in batches[1]} == {"r0", "r1"}
    assert stats.peak_running == 4


def test_budget_engine_blocks_fit_the_budget_and_one_sequence():
    from rollout.worker import budget_engine_blocks

    assert budget_engine_blocks(1000, 32) == 31 + 1  # whole blocks within the budget + null block
    assert budget_engine_blocks(1024, 32) == 32 + 1
    # a budget of exactly one 200-token sequence: 7 blocks (224 tokens), as vLLM needs to start
    assert budget_engine_blocks(200, 32, max_model_len=200) == 7 + 1
