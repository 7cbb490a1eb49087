"""What the driver sends a learner rank each step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class TrainBatch:
    """One rank's share of a step's sequences (lists of equal length N).

    Mini-batches (`learner.mini_batches`): the driver (`rl.batches.make_train_shards`) splits the
    step's prompt groups into M mini-batches and shares each among the ranks, so every rank's
    shard names the same M mini-batches (a rank may hold no sequence of one); the learner takes
    one optimizer step per mini-batch. Without `mini_batch` / `mini_batch_norms` (a batch built
    by hand) the shard is one mini-batch whose counts are `num_tokens`, `num_seqs`, `max_len`.
    """

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    advantages: list[list[float]]
    """Per response token, [len(response_ids[i])] each."""
    rollout_logprobs: list[list[float]]
    """The behavior log-prob of each sampled token (the engine's, under the distribution it
    sampled from), [len(response_ids[i])] each: the behavior policy of off-policy correction."""
    num_tokens: float
    """Valid response tokens of the GLOBAL batch (all ranks)."""
    num_seqs: float
    """Sequences with >= 1 response token in the GLOBAL batch."""
    max_len: float
    """Dr. GRPO's constant C."""
    mini_batch: Optional[list[int]] = None
    """[N]: the mini-batch of each sequence, in 0 .. len(mini_batch_norms) - 1; None: all in 0."""
    mini_batch_norms: Optional[list[tuple[float, float, float]]] = None
    """Per mini-batch (num_tokens, num_seqs, max_len) of that mini-batch over the GLOBAL batch
    (every rank's sequences of it): its LossNorm. The same list on every rank; None: one
    mini-batch, [(num_tokens, num_seqs, max_len)]."""

    def mini_batch_indices(self) -> list[list[int]]:
        """Sequence indices of each mini-batch, [M] lists (some may be empty on this rank)."""
        norms = self.mini_batch_norms
        count = len(norms) if norms is not None else 1
        out: list[list[int]] = [[] for _ in range(count)]
        for i in range(len(self.response_ids)):
            m = self.mini_batch[i] if self.mini_batch is not None else 0
            if not 0 <= m < count:
                raise ValueError(f"TrainBatch.mini_batch[{i}] = {m} is outside the {count} mini-batch(es) "
                                 "of mini_batch_norms")
            out[m].append(i)
        return out

    def mini_batch_loss_norms(self) -> list[tuple[float, float, float]]:
        """(num_tokens, num_seqs, max_len) of each mini-batch (the whole batch's when unsplit)."""
        if self.mini_batch_norms is None:
            return [(self.num_tokens, self.num_seqs, self.max_len)]
        return [tuple(n) for n in self.mini_batch_norms]
