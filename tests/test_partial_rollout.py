"""Partial rollouts (rollout.partial): a weight update interrupts the rollout in flight; the
unfinished samples resume from their prefixes under the new weights, every token stamped with
the weights version that produced it."""

import time

import pytest

from rollout.records import SampleRequest

pytestmark = pytest.mark.slow


def test_interrupted_samples_resume_from_their_prefix_under_new_weights(tiny_model_dir, make_learner):
    from rollout.worker import RolloutWorker

    worker = RolloutWorker(tiny_model_dir, dtype="float32", max_model_len=256, gpu_memory_utilization=0.05, seed=0)
    learner = make_learner(tiny_model_dir, "model.dtype=float32")
    try:
        requests = [SampleRequest(g, worker.tokenizer(f"What is {g} + {g}?")["input_ids"]) for g in range(2)]
        # The flag is read before every engine step once sequences run: False, False, then True,
        # so the rollout takes three engine steps (the prefill gives each sample its first token)
        # and is interrupted, as the control thread would do it.
        steps = {"n": 0}

        def interrupt_after_two_steps():
            steps["n"] += 1
            return steps["n"] > 2

        worker._interrupt.is_set = interrupt_after_two_steps  # the flag's reader, seen by run_rollout
        first = worker.generate(requests, group_size=3, max_new_tokens=40, interruptible=True)
        del worker._interrupt.is_set
        assert not first.samples and len(first.unfinished) == 6  # nothing finishes in 3 steps of 40
        assert all(1 <= len(p.response_ids) <= 3 and p.token_versions == [0] * len(p.response_ids)
                   for p in first.unfinished)
        assert all(len(p.logprobs) == len(p.response_ids) for p in first.unfinished)

        worker.load_weights(learner.export_weights(), version=1)  # the update the interrupt made way for
        resumed = worker.resume(first.unfinished)
        assert not resumed.unfinished and len(resumed.samples) == 6
        by_key = {(p.group_id, p.sample_index): p for p in first.unfinished}
        for s in resumed.samples:
            prefix = by_key[(s.group_id, s.sample_index)]
            assert s.response_ids[:len(prefix.response_ids)] == prefix.response_ids  # resumed, not redone
            assert s.logprobs[:len(prefix.logprobs)] == prefix.logprobs
            n_old = len(prefix.response_ids)
            assert s.token_versions == [0] * n_old + [1] * (len(s.response_ids) - n_old)
            assert s.policy_version == 0  # the oldest token's version: what staleness counts
            assert len(s.logprobs) == len(s.response_ids) <= 40
            assert s.prompt_ids == requests[s.group_id].prompt_ids
    finally:
        worker.shutdown()


def test_interrupt_reaches_a_rollout_in_flight_through_the_actor(tiny_model_dir):
    import ray

    from rl.actors import RolloutActor

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        from rl.config import RolloutConfig

        actor = RolloutActor.remote(tiny_model_dir, RolloutConfig(gpu_memory_utilization=0.05),
                                    dtype="float32", max_model_len=512, seed=0)
        ray.get(actor.ready.remote())
        requests = [SampleRequest(g, [5 + g, 6, 7, 8]) for g in range(8)]
        rollout = actor.generate.remote(requests, group_size=8, max_new_tokens=400, interruptible=True)
        time.sleep(1.0)
        t0 = time.perf_counter()
        ray.get(actor.interrupt.remote())  # runs on the control thread while generate runs
        interrupt_s = time.perf_counter() - t0
        result = ray.get(rollout)
        assert interrupt_s < 5.0
        assert len(result.samples) + len(result.unfinished) == 64  # every sample once, either way
        assert result.unfinished, "the rollout of 64 x 400 tokens finished before the interrupt"
        # the interrupt is spent on the next load: a later rollout runs to the end
        ray.get(actor.load_weights.remote({}, 1))
        again = ray.get(actor.generate.remote(requests[:1], group_size=2, max_new_tokens=8, interruptible=True))
        assert len(again.samples) == 2 and not again.unfinished
        assert {s.policy_version for s in again.samples} == {1}
    finally:
        ray.shutdown()
