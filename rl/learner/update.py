"""One training step on a rank's share of the batch: `ppo_epochs` passes over it, one optimizer
step per mini-batch (`learner.mini_batches`, split by the driver in rl/batches.py).

Several learners form a data-parallel group: each takes a share of the sequences, losses are
normalized by the GLOBAL token/sequence counts (of the mini-batch), and gradients are summed
with all_reduce (or reduce-scattered by FSDP), so the update does not depend on how the batch
was split. Objectives with batch-level statistics (HAPO's entropy pivot and scale) get them from
every rank's tokens, once per step before the first update: each rank computes its shard's
entropies and the ranks gather them among themselves, so nothing goes through the driver.

Proximal ("old") log-probs: with one epoch and one mini-batch the policy that is trained IS
the proximal one, so `old_logp = logp.detach()` of the training forward (no second forward).
Otherwise one no-grad forward over the rank's shard, with the training passes' micro-batching,
computes them once per step before the first update, and every pass uses them.

Off-policy correction (`learner.behavior_correction`): the weight w = exp(prox - behav) between
the proximal policy and the behavior policy (the engine's log-probs, `rollout_logprobs`) goes
through the objective's `behavior_weights` (token or sequence level, truncated or masked) into
`Objective.loss(behavior_weight=...)`. docs/ALGORITHMS.md, "PPO epochs, mini-batches and
off-policy correction".
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any, Optional

import torch

from rl.config import BehaviorCorrectionConfig, LearnerConfig
from rl.learner.batch import TrainBatch
from rl.learner.micro_batches import MicroBatcher
from rl.learner.model import PolicyModel
from rl.learner.parallel import DataParallel
from rl.logprobs import response_logprobs, right_align
from rl.objectives import Objective
from rl.objectives.common import LossNorm, behavior_log_weight, ess_fraction, k3_from_log_ratio, masked_sum

_NONE = BehaviorCorrectionConfig(mode="none")
_BEHAVIOR_SUMS = ("sum_w", "sum_w2", "n", "sum_kl", "over_cap")


def _adamw(params: list, lr: float, weight_decay: float, fused: bool) -> torch.optim.Optimizer:
    """AdamW, fused where torch supports it (one kernel over all tensors instead of a Python
    loop per tensor); FSDP's DTensor shards take the plain one."""
    if fused:
        try:
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _align(rows: list[torch.Tensor], width: int, device: torch.device) -> torch.Tensor:
    """Per-sequence 1-D tensors -> [len(rows), width] float32, right-aligned (as the responses)."""
    out = torch.zeros(len(rows), width, dtype=torch.float32, device=device)
    for i, row in enumerate(rows):
        if row.numel():
            out[i, width - row.numel():] = row
    return out


class PolicyUpdate:
    """The optimizer, its LR schedule, and `step(batch)`."""

    def __init__(self, policy: PolicyModel, learner: LearnerConfig, objective: Objective,
                 temperature: float, group: DataParallel):
        self.policy = policy
        self.config = learner
        self.objective = objective
        self.temperature = temperature
        self.entropy_temperature = 1.0 if objective.entropy_of_raw_logits else temperature
        """Temperature of the entropies the objective gets (loss, batch_stats): 1 (raw logits)
        for HAPO, whose rollout processor scores raw logits; the sampling one otherwise."""
        self.group = group
        self.micro_batches = MicroBatcher(policy, learner.resolved_layout, learner.micro_batch_tokens,
                                          learner.packed_row_tokens)
        self.make_optimizer()
        self.history: list[dict[str, float]] = []
        """Per optimizer step of the last `step` (over all ranks): epoch, mini_batch, loss,
        grad_norm, clip_fraction, ratio_max."""

    def make_optimizer(self) -> None:
        """AdamW + warm-up schedule over the trainable parameters (again after FSDP sharding,
        which replaces every parameter by its DTensor shard)."""
        self.params = self.policy.trainable_parameters()
        self.optimizer = _adamw(self.params, self.config.lr, self.config.weight_decay, fused=not self.policy.fsdp)
        warmup = max(1, self.config.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: min(1.0, (step + 1) / warmup))

    def step(self, batch: TrainBatch) -> tuple[dict[str, float], Any]:
        """`ppo_epochs` x `mini_batches` optimizer steps on this rank's share -> (metrics over all
        ranks and optimizer steps, batch statistics).

        loss and grad_norm are means over the step's optimizer steps (the last one alone would
        hide the first passes); token metrics are token means over every pass; `self.history`
        keeps each optimizer step's loss, grad_norm, clip_fraction and ratio_max.
        """
        start = time.perf_counter()
        cfg = self.config
        groups = batch.mini_batch_indices()
        norms = [LossNorm(*n) for n in batch.mini_batch_loss_norms()]
        # Fewer mini-batches than configured happens when reward failures dropped groups and
        # fewer groups than learner.mini_batches are left (the driver splits what there is).
        if not 1 <= len(groups) <= cfg.mini_batches:
            raise ValueError(f"the TrainBatch is split into {len(groups)} mini-batch(es) but learner.mini_batches = "
                             f"{cfg.mini_batches}: build the shards with rl.batches.make_train_shards(..., "
                             "mini_batches=config.learner.mini_batches)")
        batch_stats = self.global_batch_stats(batch) if self.objective.needs_batch_stats else None
        proximal, t_proximal = None, 0.0
        if cfg.ppo_epochs > 1 or len(groups) > 1:
            t0 = time.perf_counter()
            proximal = self.proximal_logprobs(batch, groups)
            t_proximal = time.perf_counter() - t0
        sums: dict[str, float] = {}
        behavior = dict.fromkeys(_BEHAVIOR_SUMS, 0.0)
        weight_max = 0.0
        losses, clips, step_tokens, ratio_maxes, grad_norms, steps = [], [], [], [], [], []
        first = {"response_tokens": 0.0, "tokens": 0.0, "processed_tokens": 0.0, "real_tokens": 0.0,
                 "micro_batches": 0}
        # Non-finite guard: a step with a NaN/inf loss or gradient norm is not applied. With one
        # optimizer step that means skipping it; with several, the weights, AdamW state and LR
        # schedule go back to where the step began.
        several = cfg.ppo_epochs * len(groups) > 1
        snapshot = self._snapshot() if several else None
        skipped = False
        for epoch in range(cfg.ppo_epochs):
            for m, idx in enumerate(groups):
                self.optimizer.zero_grad(set_to_none=True)
                local = self.accumulate_gradients(batch, batch_stats, indices=idx, norm=norms[m],
                                                  proximal=proximal, correction=cfg.behavior_correction,
                                                  measure_behavior=epoch == 0)
                if self.group.world_size > 1 and not self.policy.fsdp:  # FSDP reduce-scatters in backward
                    for p in self.params:
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                        self.group.all_reduce(p.grad)
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    self.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
                if self.policy.fsdp:
                    from rl.fsdp import full_tensor

                    grad_norm = full_tensor(grad_norm)  # the norm over all shards
                # grad_norm is global (gradients already reduced), so every rank decides alike
                if skipped or not math.isfinite(float(grad_norm)) or not math.isfinite(local["loss"]):
                    skipped = True
                    self.optimizer.zero_grad(set_to_none=True)
                else:
                    self.optimizer.step()
                    self.scheduler.step()
                for k, v in local["sums"].items():
                    sums[k] = sums.get(k, 0.0) + v
                losses.append(local["loss"])
                clips.append(local["sums"].get("clip_ratio", 0.0))
                step_tokens.append(local["response_tokens"])
                ratio_maxes.append(local["ratio_max"])
                grad_norms.append(float(grad_norm))
                steps.append((epoch, m))
                if epoch == 0:
                    for k in first:
                        first[k] += local[k]
                    for k in _BEHAVIOR_SUMS:
                        behavior[k] += local["behavior"][k]
                    weight_max = max(weight_max, local["behavior"]["weight_max"])
        if skipped and snapshot is not None:
            self._restore(snapshot)
        n_steps = len(losses)
        keys = sorted(sums)
        head = [first["response_tokens"], first["tokens"], first["processed_tokens"], first["real_tokens"]]
        reduced = self.group.all_reduce(torch.tensor(
            head + [behavior[k] for k in _BEHAVIOR_SUMS] + losses + clips + step_tokens + [sums[k] for k in keys],
            dtype=torch.float64, device=self.policy.device)).cpu().tolist()
        maxima = self._all_reduce_max(ratio_maxes + [weight_max])
        response_tokens, tokens, processed, real = reduced[:4]
        b = dict(zip(_BEHAVIOR_SUMS, reduced[4:4 + len(_BEHAVIOR_SUMS)]))
        rest = reduced[4 + len(_BEHAVIOR_SUMS):]
        g_losses, g_clips, g_tokens = rest[:n_steps], rest[n_steps:2 * n_steps], rest[2 * n_steps:3 * n_steps]
        g_sums = rest[3 * n_steps:]
        # every pass sees each token once: token means over all passes
        all_tokens = max(response_tokens, 1.0) * cfg.ppo_epochs
        out = {k: g_sums[j] / all_tokens for j, k in enumerate(keys)}
        self.history = [{"epoch": float(e), "mini_batch": float(m), "loss": g_losses[j], "grad_norm": grad_norms[j],
                         "clip_fraction": g_clips[j] / g_tokens[j] if g_tokens[j] else 0.0,
                         "ratio_max": maxima[j]} for j, (e, m) in enumerate(steps)]
        n_valid = b["n"]
        out.update({
            "loss": sum(g_losses) / n_steps,
            "grad_norm": sum(grad_norms) / n_steps,
            "lr": self.scheduler.get_last_lr()[0],
            "train/micro_batches": float(first["micro_batches"]),
            "train/padding_fraction": (processed - real) / processed if processed else 0.0,
            "train/tokens": tokens,
            "train/processed_tokens": processed,
            "actor/optimizer_steps": float(n_steps),
            "actor/clip_fraction": out.get("clip_ratio", 0.0),
            "actor/approx_kl": out.get("actor/approx_kl", 0.0),
            "actor/ratio_max": max(maxima[:n_steps]),
            "behavior/ess_fraction": ess_fraction(b["sum_w"], b["sum_w2"], n_valid),
            "behavior/mismatch_kl": b["sum_kl"] / n_valid if n_valid else 0.0,
            "behavior/weight_max": maxima[n_steps],
            "behavior/over_cap_fraction": b["over_cap"] / n_valid if n_valid else 0.0,
            "time/proximal_logprobs": t_proximal,
            "time/train_compute": time.perf_counter() - start,
            "faults/skipped_step": float(skipped),
        })
        return out, batch_stats

    def _snapshot(self) -> dict:
        """What a step may change: the trainable weights, AdamW's state and the LR schedule."""
        return {"params": [p.detach().clone() for p in self.params],
                "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                "scheduler": copy.deepcopy(self.scheduler.state_dict())}

    def _restore(self, snapshot: dict) -> None:
        with torch.no_grad():
            for p, saved in zip(self.params, snapshot["params"]):
                p.copy_(saved)
        self.optimizer.load_state_dict(snapshot["optimizer"])
        self.scheduler.load_state_dict(snapshot["scheduler"])

    def _all_reduce_max(self, values: list[float]) -> list[float]:
        """Element-wise max over ranks (a MAX all_reduce, not the sum path)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.policy.device)
        if self.group.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.cpu().tolist()

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
                    _, ent = response_logprobs(policy.net, mb, self.entropy_temperature, with_entropy=True)
                values.append(ent[mb.response_mask].double())
        local = torch.cat(values) if values else torch.zeros(0, dtype=torch.float64, device=policy.device)
        everything = self.group.all_gather_1d(local).cpu()
        return self.objective.batch_stats(torch.ones(1, everything.numel(), dtype=torch.bool),
                                          entropy=everything.unsqueeze(0))

    def proximal_logprobs(self, batch: TrainBatch, groups: list[list[int]]) -> list[torch.Tensor]:
        """Log-probs of every response token under the current (pre-update) policy: no gradient,
        mini-batch by mini-batch with the training passes' micro-batching (so the first pass
        reproduces them) -> one float32 tensor [len(response_ids[i])] per sequence, on device."""
        policy = self.policy
        policy.net.train()  # the training passes' mode (no dropout in these models; same numerics)
        out: list[torch.Tensor] = [torch.zeros(0, device=policy.device) for _ in batch.response_ids]
        with torch.no_grad():
            for rows in groups:
                prompts = [batch.prompt_ids[i] for i in rows]
                responses = [batch.response_ids[i] for i in rows]
                if policy.fsdp:  # agreed BEFORE the first forward: each forward is a collective
                    from rl.fsdp import pad_to_common_count

                    common_count = pad_to_common_count(len(self.micro_batches.plan(prompts, responses)),
                                                       policy.device)
                count = 0
                for idx, mb, _, _ in self.micro_batches(prompts, responses):
                    count += 1
                    with policy.autocast():
                        logp, _ = response_logprobs(policy.net, mb, self.temperature, with_entropy=True)
                    T = logp.shape[1]
                    for j, i in enumerate(idx):
                        n = len(responses[i])
                        out[rows[i]] = logp[j, T - n:].float().clone()
                if policy.fsdp:  # pair up with the other ranks' forwards
                    ids = torch.full((1, 2), policy.pad_id, dtype=torch.long, device=policy.device)
                    for _ in range(common_count - count):
                        with policy.autocast():
                            policy.net(input_ids=ids)
        return out

    def accumulate_gradients(self, batch: TrainBatch, batch_stats: Any = None, *,
                             indices: Optional[list[int]] = None, norm: Optional[LossNorm] = None,
                             proximal: Optional[list[torch.Tensor]] = None,
                             correction: Optional[BehaviorCorrectionConfig] = None,
                             measure_behavior: bool = True) -> dict:
        """Forward + backward over this rank's micro-batches of `indices` (default: every
        sequence), adding into `.grad` (no step).

        norm: that mini-batch's global LossNorm (default: the batch's counts).
        proximal: per-sequence proximal log-probs (`proximal_logprobs`); None: the training
            forward's own, detached (one optimizer step per batch: they are the proximal ones).
        correction: off-policy correction (None: none, the plain objective).
        measure_behavior: add the behavior/* sums (each sequence once per step: the first epoch).

        Returns this rank's sums: loss, token counts, token-weighted metric sums, the largest
        token ratio, and the behavior sums.
        """
        policy, obj = self.policy, self.objective
        correction = correction or _NONE
        policy.net.train()
        if indices is None:
            indices = list(range(len(batch.response_ids)))
        if norm is None:
            norm = LossNorm(batch.num_tokens, batch.num_seqs, batch.max_len)
        prompts = [batch.prompt_ids[i] for i in indices]
        responses = [batch.response_ids[i] for i in indices]
        lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
        sums: dict[str, float] = {}
        behavior = dict.fromkeys(_BEHAVIOR_SUMS, 0.0)
        behavior["weight_max"] = 0.0
        total_loss = 0.0
        ratio_max = 0.0
        processed = real = micro_batches = 0
        if policy.fsdp:  # agreed BEFORE the first forward: each forward/backward is a collective
            from rl.fsdp import pad_to_common_count

            common_count = pad_to_common_count(len(self.micro_batches.plan(prompts, responses)), policy.device)
        for idx, mb, ref_mb, (pass1_processed, pass1_real) in self.micro_batches(
                prompts, responses, with_ref=obj.needs_ref):
            seqs = [indices[i] for i in idx]
            micro_batches += 1
            processed += mb.num_processed_tokens + pass1_processed
            real += mb.num_real_tokens + pass1_real
            T = mb.response_ids.shape[1]
            mask = mb.response_mask
            adv = right_align([batch.advantages[i] for i in seqs], T).to(policy.device)
            rollout_lp = right_align([batch.rollout_logprobs[i] for i in seqs], T).to(policy.device)
            with policy.autocast():
                # entropy is a logged metric for every objective
                logp, entropy = response_logprobs(policy.net, mb, self.temperature, with_entropy=True)
                if self.entropy_temperature != self.temperature and obj.needs_entropy:
                    # the objective scores raw-logit entropies (HAPO): no gradient flows through them
                    with torch.no_grad():
                        _, objective_entropy = response_logprobs(policy.net, mb, self.entropy_temperature,
                                                                 with_entropy=True)
                else:
                    objective_entropy = entropy
                ref_logp = None
                if obj.needs_ref:
                    ref_model, ctx = policy.reference()
                    with torch.no_grad(), ctx:
                        ref_logp, _ = response_logprobs(ref_model, ref_mb, self.temperature)
            if proximal is None:
                # One optimizer step per batch: the policy being trained IS the proximal one, so
                # old_logp equals logp detached (ratio 1) without a second forward.
                old_logp = logp.detach()
            else:
                old_logp = _align([proximal[i] for i in seqs], T, policy.device)
            weight, log_w = None, None
            if correction.mode != "none" or measure_behavior:
                log_w = behavior_log_weight(old_logp, rollout_lp, mask)
            if correction.mode != "none":
                weight = obj.behavior_weights(log_w, mask, correction.mode, correction.cap,
                                              entropy=objective_entropy.detach() if entropy is not None else None)
            loss, metrics = obj.loss(logp, old_logp, adv, mask, ref_logp=ref_logp,
                                     entropy=objective_entropy if obj.needs_entropy else None,
                                     norm=norm, batch_stats=batch_stats, behavior_weight=weight)
            loss.backward()
            total_loss += float(loss.detach())
            n_tok = float(mb.num_response_tokens)
            metrics = dict(metrics)
            metrics["entropy"] = float(entropy[mask].float().mean()) if n_tok else 0.0
            diff = (rollout_lp - old_logp)[mask]
            metrics["train/rollout_logprob_abs_diff"] = float(diff.abs().mean()) if n_tok else 0.0
            with torch.no_grad():
                d = (old_logp - logp.detach()).clamp(-20.0, 20.0)  # log(prox / current)
                metrics["actor/approx_kl"] = (float(masked_sum(k3_from_log_ratio(d), mask)) / n_tok
                                              if n_tok else 0.0)
                if n_tok:
                    ratio_max = max(ratio_max, float(torch.exp(-d)[mask].max()))
                if measure_behavior:
                    w = torch.exp(log_w)
                    wv = w[mask].double()
                    behavior["sum_w"] += float(wv.sum())
                    behavior["sum_w2"] += float(wv.square().sum())
                    behavior["n"] += float(wv.numel())
                    behavior["sum_kl"] += float(k3_from_log_ratio(log_w)[mask].double().sum())
                    behavior["over_cap"] += float((wv > correction.cap).sum())
                    if wv.numel():
                        behavior["weight_max"] = max(behavior["weight_max"], float(wv.max()))
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * n_tok
        if policy.fsdp:
            from rl.fsdp import zero_gradient_pass

            for _ in range(common_count - micro_batches):  # pair up with the other ranks' collectives
                with policy.autocast():
                    zero_gradient_pass(policy.net, policy.device, policy.pad_id)
        return {"loss": total_loss, "sums": sums, "micro_batches": micro_batches,
                "response_tokens": float(sum(len(r) for r in responses)),
                "tokens": float(sum(lengths)),
                "processed_tokens": float(processed), "real_tokens": float(real),
                "ratio_max": ratio_max, "behavior": behavior}
