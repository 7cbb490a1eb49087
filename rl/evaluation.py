"""Held-out evaluation: reward mean and pass@k of the current policy on prompts it never
trains on (`data.eval_path`, `eval.*`), run by the trainer before the first step, every
`trainer.eval_every` steps and at the end."""

from __future__ import annotations

import dataclasses
import math
import statistics
import time

from rl.sampling import reward_columns
from rollout.records import SampleRequest


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt with c passing samples among n (Chen et al., 2021,
    arXiv:2107.03374): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


class Evaluator:
    """Args: config (the run's Config), tokenizer, rollout (RolloutGroup), rewards (RewardExecutor)."""

    def __init__(self, config, tokenizer, rollout, rewards):
        from rl.data import PromptSource

        self.config, self.rollout, self.rewards = config, rollout, rewards
        data = dataclasses.replace(config.data, path=config.data.eval_path, split=config.data.eval_split,
                                   shuffle=False, prompts_per_step=1)
        self.prompts = PromptSource(data, tokenizer, seed=config.trainer.seed).prompts[:config.eval.max_prompts]

    def run(self, extra_args: dict | None = None) -> dict[str, float]:
        """eval/reward_mean, eval/pass@1, eval/pass@k (k = eval.samples_per_prompt), eval/prompts,
        eval/seconds."""
        e = self.config.eval
        k = e.samples_per_prompt
        start = time.perf_counter()
        requests = [SampleRequest(i, p.token_ids) for i, p in enumerate(self.prompts)]
        results = self.rollout.generate(requests, group_size=k, max_new_tokens=self.config.rollout.max_new_tokens,
                                        temperature=e.temperature, top_p=1.0, extra_args=extra_args,
                                        # the same noise at every evaluation: differences between
                                        # two evaluations come from the weights, and training's
                                        # own sampling noise does not depend on them
                                        seed=(self.config.trainer.seed + 2**30) % 2**31)
        samples = sorted((s for r in results for s in r.samples), key=lambda s: (s.group_id, s.sample_index))
        columns = reward_columns(self.prompts, samples)
        scored = self.rewards.score([self.prompts[s.group_id].text for s in samples],
                                    [s.response_text for s in samples], columns, [s.group_id for s in samples])
        passed: dict[int, int] = {}
        rewards = []
        for s, r, ok in zip(samples, scored.rewards, scored.valid):
            rewards.append(r if ok else 0.0)
            passed[s.group_id] = passed.get(s.group_id, 0) + int(ok and r >= e.pass_threshold)
        return {"eval/reward_mean": statistics.fmean(rewards) if rewards else 0.0,
                "eval/pass@1": statistics.fmean(pass_at_k(k, c, 1) for c in passed.values()),
                f"eval/pass@{k}": statistics.fmean(pass_at_k(k, c, k) for c in passed.values()),
                "eval/prompts": float(len(self.prompts)), "eval/seconds": time.perf_counter() - start}
