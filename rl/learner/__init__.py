"""Learner worker: one data-parallel rank of the trained model. Its parts, one job each:

- rl/learner/model.py        the model: loading, LoRA, reference, FSDP sharding, full weights
- rl/learner/micro_batches.py a rank's sequences cut into micro-batches in the chosen layout
- rl/learner/update.py       forward/backward over the micro-batches, the optimizer step
- rl/learner/export.py       weights out to the rollout engines (flat buffer or broadcast)
- rl/learner/checkpoint.py   Hugging Face checkpoints and the training state for resume

A plain class, so tests run it without Ray; `rl.actors` wraps it as a Ray actor. Every public
method is what the driver calls remotely.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from rl import perf
from rl.config import LearnerConfig, ModelConfig, ObjectiveConfig
from rl.learner import checkpoint
from rl.learner.batch import TrainBatch
from rl.learner.export import WeightExport
from rl.learner.model import DTYPES, PolicyModel
from rl.learner.parallel import DataParallel, free_endpoint
from rl.learner.update import PolicyUpdate
from rl.logprobs import make_micro_batch, response_logprobs

__all__ = ["Learner", "TrainBatch", "DTYPES"]


class Learner:
    """Args:
        model: the `model` section with `path` resolved (rl.train.resolve_model_path).
        learner: the `learner` section.
        objective: the `objective` section.
        temperature: rollout.temperature: the learner scores tokens at the sampling temperature.
        seed: trainer.seed (each rank adds its rank).
        init_weights_path: full fine-tuning resume: the checkpoint's weights instead of model.path.
        rank, world_size: this rank in the data-parallel group.
        dist_address: rank 0's endpoint; None: the owner calls `join_data_parallel` later.
        num_threads: torch threads (default: every core).
    """

    def __init__(self, model: ModelConfig, learner: LearnerConfig, objective: ObjectiveConfig, *,
                 temperature: float = 1.0, seed: int = 0, init_weights_path: str | None = None,
                 rank: int = 0, world_size: int = 1, dist_address: str | None = None,
                 num_threads: int | None = None):
        torch.set_num_threads(num_threads or os.cpu_count() or 1)
        torch.manual_seed(seed + rank)
        self.model_config, self.learner_config = model, learner
        self.objective = objective.build()
        self.group = DataParallel(rank, world_size)
        self.policy = PolicyModel(model, learner, self.objective.needs_ref, init_weights_path)
        self.updater = PolicyUpdate(self.policy, learner, self.objective, temperature, self.group)
        self.weights = WeightExport(self.policy, rank)
        self._peak: float | None = None
        if world_size > 1 and dist_address is not None:
            self.join_data_parallel(dist_address)

    # --- data parallelism -------------------------------------------------------------

    def endpoint(self) -> str:
        """Where a data-parallel group with this learner as rank 0 can meet."""
        return free_endpoint()

    def join_data_parallel(self, address: str) -> None:
        """Join the learners' group at `address` (rank 0's `endpoint()`); every rank at once.
        Under strategy fsdp the model is sharded across the group here."""
        if self.group.world_size > 1 and not self.group.joined:
            self.group.join(address, self.policy.device)
            if self.learner_config.strategy == "fsdp":
                self.policy.shard()
                self.updater.make_optimizer()

    # --- training ---------------------------------------------------------------------

    def update(self, batch: TrainBatch) -> tuple[dict[str, float], Any]:
        """The step's update (learner.ppo_epochs x mini-batches optimizer steps) -> (metrics
        reduced over all ranks, the objective's batch statistics (HAPO's, which the next rollout
        samples with), or None). perf/learner_* count this rank's sequences against this rank's
        device peak (the ranks run side by side on equal shares)."""
        metrics, batch_stats = self.updater.step(batch)
        metrics.update(perf.learner_metrics(self.policy.hf_config, [len(p) for p in batch.prompt_ids],
                                            [len(r) for r in batch.response_ids], metrics["time/train_compute"],
                                            self.peak_tflops()))
        return metrics, batch_stats

    def peak_tflops(self) -> float:
        """This rank's device peak for the autocast dtype (rl/perf.py: GPU datasheet table, or a
        matmul probe on CPU, cached per machine)."""
        if self._peak is None:
            self._peak = perf.peak_tflops(self.policy.device, self.policy.dtype)
        return self._peak

    def score(self, prompt_ids: list[int], token_ids: list[int]) -> list[float]:
        """Log-probs of `token_ids` after `prompt_ids` at temperature 1 (raw model), for sync checks."""
        policy = self.policy
        policy.net.eval()
        mb = policy.to_device(make_micro_batch([prompt_ids], [token_ids], policy.pad_id))
        with torch.no_grad(), policy.autocast():
            logp, _ = response_logprobs(policy.net, mb, 1.0)
        return logp[0, logp.shape[1] - len(token_ids):].tolist()

    # --- weights to the rollout engines (rl/weight_sync.py) --------------------------------

    def export_weights(self) -> dict[str, torch.Tensor]:
        """The weights under Hugging Face names in the rollout dtype (LoRA merged): the plain
        dict form, for tests and the legacy path of `rl.bench sync`."""
        named = self.policy.weights_to_send()
        return {k: v.to(self.policy.dtype).contiguous() for k, v in named.items()}

    def export_flat_weights(self):
        return self.weights.flat()

    def weight_broadcast_endpoint(self) -> dict:
        return self.weights.broadcast_endpoint()

    def join_weight_broadcast(self, master_address: str, master_port: int, backend: str,
                              world_size: int, bucket_bytes: int) -> None:
        self.weights.join_broadcast(master_address, master_port, backend, world_size, bucket_bytes)

    def weight_metas(self) -> list:
        return self.weights.metas()

    def broadcast_weights(self) -> dict[str, float]:
        return self.weights.broadcast()

    # --- checkpoints ------------------------------------------------------------------

    def save_checkpoint(self, path: str, tokenizer_source: str) -> None:
        checkpoint.save_checkpoint(self.policy, self.updater, path, tokenizer_source, self.group.rank)

    def load_training_state(self, path: str) -> None:
        checkpoint.load_training_state(self.policy, self.updater, path, self.group.world_size)
