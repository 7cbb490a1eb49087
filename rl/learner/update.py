"""One optimizer step on a rank's share of the batch.

Several learners form a data-parallel group: each takes a share of the sequences, losses are
normalized by the GLOBAL token/sequence counts, and gradients are summed with all_reduce
(or reduce-scattered by FSDP), so the update does not depend on how the batch was split.
Objectives with batch-level statistics (HAPO's entropy pivot and scale) get them from every
rank's tokens: each rank computes its shard's entropies and the ranks gather them among
themselves, so nothing goes through the driver.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from rl.config import LearnerConfig
from rl.learner.batch import TrainBatch
from rl.learner.micro_batches import MicroBatcher
from rl.learner.model import PolicyModel
from rl.learner.parallel import DataParallel
from rl.logprobs import response_logprobs, right_align
from rl.objectives import Objective
from rl.objectives.common import LossNorm


def _adamw(params: list, lr: float, weight_decay: float, fused: bool) -> torch.optim.Optimizer:
    """AdamW, fused where torch supports it (one kernel over all tensors instead of a Python
    loop per tensor); FSDP's DTensor shards take the plain one."""
    if fused:
        try:
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


class PolicyUpdate:
    """The optimizer, its LR schedule, and `step(batch)`."""

    def __init__(self, policy: PolicyModel, learner: LearnerConfig, objective: Objective,
                 temperature: float, group: DataParallel):
        self.policy = policy
        self.config = learner
        self.objective = objective
        self.temperature = temperature
        self.group = group
        self.micro_batches = MicroBatcher(policy, learner.resolved_layout, learner.micro_batch_tokens,
                                          learner.packed_row_tokens)
        self.make_optimizer()

    def make_optimizer(self) -> None:
        """AdamW + warm-up schedule over the trainable parameters (again after FSDP sharding,
        which replaces every parameter by its DTensor shard)."""
        self.params = self.policy.trainable_parameters()
        self.optimizer = _adamw(self.params, self.config.lr, self.config.weight_decay, fused=not self.policy.fsdp)
        warmup = max(1, self.config.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: min(1.0, (step + 1) / warmup))

    def step(self, batch: TrainBatch) -> tuple[dict[str, float], Any]:
        """One optimizer step on this rank's share -> (metrics over all ranks, batch statistics)."""
        start = time.perf_counter()
        batch_stats = self.global_batch_stats(batch) if self.objective.needs_batch_stats else None
        self.optimizer.zero_grad(set_to_none=True)
        local = self.accumulate_gradients(batch, batch_stats)
        if self.group.world_size > 1 and not self.policy.fsdp:  # FSDP reduce-scatters in backward
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                self.group.all_reduce(p.grad)
        sums = local["sums"]
        keys = sorted(sums)
        reduced = self.group.all_reduce(torch.tensor(
            [local["loss"], local["response_tokens"], local["tokens"], local["processed_tokens"],
             local["real_tokens"]] + [sums[k] for k in keys], dtype=torch.float64, device=self.policy.device))
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.params, self.config.grad_clip if self.config.grad_clip > 0 else float("inf"))
        if self.policy.fsdp:
            from rl.fsdp import full_tensor

            grad_norm = full_tensor(grad_norm)  # the norm over all shards
        self.optimizer.step()
        self.scheduler.step()
        reduced = reduced.cpu()
        global_tokens = max(float(reduced[1]), 1.0)
        out = {k: float(reduced[5 + j]) / global_tokens for j, k in enumerate(keys)}
        tokens, processed, real = float(reduced[2]), float(reduced[3]), float(reduced[4])
        out.update({
            "loss": float(reduced[0]),
            "grad_norm": float(grad_norm),
            "lr": self.scheduler.get_last_lr()[0],
            "train/micro_batches": float(local["micro_batches"]),
            "train/padding_fraction": (processed - real) / processed if processed else 0.0,
            "train/tokens": tokens,
            "train/processed_tokens": processed,
            "time/train_compute": time.perf_counter() - start,
        })
        return out, batch_stats

    def global_batch_stats(self, batch: TrainBatch) -> Any:
        """The objective's batch statistics over every rank's valid tokens.

        Entropies of the current (pre-update) policy, no gradient, on this rank's share; the
        ranks all-gather the valid tokens' values and each computes the same statistics
        (HAPO's are a quantile and a spread: order-free, so a [1, n] row of all valid tokens
        gives what the full [N, T] batch would).
        """
        policy = self.policy
        values = []
        with torch.no_grad():
            for _, mb, _, _ in self.micro_batches(batch.prompt_ids, batch.response_ids):
                with policy.autocast():
                    _, ent = response_logprobs(policy.net, mb, self.temperature, with_entropy=True)
                values.append(ent[mb.response_mask].double())
        local = torch.cat(values) if values else torch.zeros(0, dtype=torch.float64, device=policy.device)
        everything = self.group.all_gather_1d(local).cpu()
        return self.objective.batch_stats(torch.ones(1, everything.numel(), dtype=torch.bool),
                                          entropy=everything.unsqueeze(0))

    def accumulate_gradients(self, batch: TrainBatch, batch_stats: Any = None) -> dict:
        """Forward + backward over this rank's micro-batches, adding into `.grad` (no step).

        Returns this rank's sums: loss, token counts, and token-weighted metric sums.
        """
        policy, obj = self.policy, self.objective
        policy.net.train()
        norm = LossNorm(batch.num_tokens, batch.num_seqs, batch.max_len)
        lengths = [len(p) + len(r) for p, r in zip(batch.prompt_ids, batch.response_ids)]
        sums: dict[str, float] = {}
        total_loss = 0.0
        processed = real = micro_batches = 0
        if policy.fsdp:  # agreed BEFORE the first forward: each forward/backward is a collective
            from rl.fsdp import pad_to_common_count

            common_count = pad_to_common_count(len(self.micro_batches.plan(batch.prompt_ids, batch.response_ids)),
                                               policy.device)
        for idx, mb, ref_mb, (pass1_processed, pass1_real) in self.micro_batches(
                batch.prompt_ids, batch.response_ids, with_ref=obj.needs_ref):
            micro_batches += 1
            processed += mb.num_processed_tokens + pass1_processed
            real += mb.num_real_tokens + pass1_real
            T = mb.response_ids.shape[1]
            adv = right_align([batch.advantages[i] for i in idx], T).to(policy.device)
            rollout_lp = right_align([batch.rollout_logprobs[i] for i in idx], T).to(policy.device)
            with policy.autocast():
                # entropy is a logged metric for every objective
                logp, entropy = response_logprobs(policy.net, mb, self.temperature, with_entropy=True)
                ref_logp = None
                if obj.needs_ref:
                    ref_model, ctx = policy.reference()
                    with torch.no_grad(), ctx:
                        ref_logp, _ = response_logprobs(ref_model, ref_mb, self.temperature)
            # One optimizer step per rollout batch: the policy that generated the batch IS the
            # current one, so old_logp equals logp detached (ratio 1) without a second forward.
            old_logp = logp.detach()
            loss, metrics = obj.loss(logp, old_logp, adv, mb.response_mask, ref_logp=ref_logp,
                                     entropy=entropy if obj.needs_entropy else None,
                                     norm=norm, batch_stats=batch_stats)
            loss.backward()
            total_loss += float(loss.detach())
            n_tok = float(mb.num_response_tokens)
            metrics = dict(metrics)
            metrics["entropy"] = float(entropy[mb.response_mask].float().mean()) if n_tok else 0.0
            diff = (rollout_lp - old_logp)[mb.response_mask]
            metrics["train/rollout_logprob_abs_diff"] = float(diff.abs().mean()) if n_tok else 0.0
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * n_tok
        if policy.fsdp:
            from rl.fsdp import zero_gradient_pass

            for _ in range(common_count - micro_batches):  # pair up with the other ranks' collectives
                with policy.autocast():
                    zero_gradient_pass(policy.net, policy.device, policy.pad_id)
        return {"loss": total_loss, "sums": sums, "micro_batches": micro_batches,
                "response_tokens": float(sum(len(r) for r in batch.response_ids)),
                "tokens": float(sum(lengths)),
                "processed_tokens": float(processed), "real_tokens": float(real)}
