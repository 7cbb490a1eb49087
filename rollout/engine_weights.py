"""A rollout worker's weights: loading new ones (object store or collective broadcast), all or
nothing, and the canary that proves they arrived.

`EngineWeights` is a part of `rollout.worker.RolloutWorker` (its base class), split out so that
each file has one job; it uses the worker's `engine`, `policy_version`, `weights_complete`,
`_interrupt` and `_request_counter`.
"""

from __future__ import annotations

import time
from typing import Any


class EngineWeights:
    def load_weights(self, weights: Any, version: int | None = None) -> dict[str, float]:
        """Load new weights in place: a `rollout.weights.FlatWeights` (zero-copy views of
        the object store's buffers) or a dict of HF names -> tensors; returns seconds and bytes.
        `version`: the weights' version, stamped on the samples generated from now on."""
        from rollout.weights import as_named_tensors, load_weights_into_worker

        start = time.perf_counter()
        self._interrupt.clear()  # the update the interrupt made way for is here
        named_tensors = as_named_tensors(weights)
        self.weights_complete = False
        self.engine.collective_rpc(load_weights_into_worker, args=(named_tensors,))
        # Cached prefixes were computed with the old weights.
        self.engine.reset_prefix_cache()
        self.weights_complete = True
        if version is not None:
            self.policy_version = version
        nbytes = sum(t.numel() * t.element_size() for t in named_tensors.values())
        return {"seconds": time.perf_counter() - start, "bytes": float(nbytes)}

    def join_weight_broadcast(self, master_address: str, master_port: int, rank: int, world_size: int,
                              backend: str, bucket_bytes: int) -> None:
        """Join the learner's broadcast group as `rank` (1..workers); blocks until every member
        (learner rank 0 included) has joined, so call it on all of them at once."""
        info = dict(master_address=master_address, master_port=master_port, rank=rank,
                    world_size=world_size, backend=backend, bucket_bytes=bucket_bytes)
        self.engine.collective_rpc("init_weight_transfer_engine", args=(info,))

    def receive_weight_broadcast(self, metas: list, version: int | None = None) -> dict[str, float]:
        """Receive one broadcast of the weights `metas` (`weight_broadcast.TensorMeta`, in the
        sender's order) and load them; runs while learner rank 0 runs `broadcast_weights`."""
        from rollout.weights import repack_tied_lm_head

        start = time.perf_counter()
        self._interrupt.clear()  # the update the interrupt made way for is here
        update = dict(names=[m.name for m in metas], dtype_names=[m.dtype for m in metas],
                      shapes=[list(m.shape) for m in metas])
        self.weights_complete = False
        self.engine.collective_rpc("start_weight_update")
        self.engine.collective_rpc("update_weights", args=(update,))
        self.engine.collective_rpc("finish_weight_update")
        self.engine.collective_rpc(repack_tied_lm_head)
        self.engine.reset_prefix_cache()  # cached prefixes were computed with the old weights
        self.weights_complete = True
        if version is not None:
            self.policy_version = version
        return {"seconds": time.perf_counter() - start, "bytes": float(sum(m.nbytes for m in metas))}

    def canary(self, prompt_ids: list[int], num_tokens: int = 16) -> tuple[list[int], list[float]]:
        """Sample `num_tokens` tokens after `prompt_ids`; return them with the engine's log-probs.

        The learner scores the same tokens; equal log-probs prove the weights arrived.
        """
        from vllm import SamplingParams

        params = SamplingParams(temperature=1.0, max_tokens=num_tokens, min_tokens=num_tokens,
                                ignore_eos=True, logprobs=0)
        result = self._run_alone(prompt_ids, params)
        token_ids = list(result.outputs[0].token_ids)
        return token_ids, [step[t].logprob for step, t in zip(result.outputs[0].logprobs, token_ids)]

    def score(self, prompt_ids: list[int], token_ids: list[int]) -> list[float]:
        """The engine's log-probs of `token_ids` after `prompt_ids`, teacher-forced: one prefill
        (prompt log-probs), no sampling. The sync check compares them with the learner's
        `score` of the same tokens, both sides running at once."""
        from vllm import SamplingParams

        params = SamplingParams(temperature=1.0, max_tokens=1, prompt_logprobs=0)
        result = self._run_alone(list(prompt_ids) + list(token_ids), params)
        start = len(prompt_ids)
        return [result.prompt_logprobs[start + i][t].logprob for i, t in enumerate(token_ids)]

    def _run_alone(self, prompt_ids: list[int], params):
        """Run one request to completion (the engine is otherwise idle between rollouts)."""
        rid = f"probe{self._request_counter}"
        self._request_counter += 1
        self.engine.add_request(rid, {"prompt_token_ids": list(prompt_ids)}, params)
        result = None
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished and out.request_id == rid:
                    result = out
        return result
